"""Small helpers shared by test packages: a free TCP port, and a pickle payload that shows whether
unpickling ran it."""

from __future__ import annotations

import pathlib
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TouchOnUnpickle:
    """Unpickling this calls Path.touch(marker): the stand-in for a malicious file's code. After a
    load, `marker.exists()` says whether the payload ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))
