"""Where fmstack keeps what it downloads and builds: one leaf module (no fmstack imports), so that any
layer (checkpoints, the compile cache, the native kernels) can ask without an import circle."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FMSTACK_CACHE_DIR (or the older $FMSTACK_CACHE), else $XDG_CACHE_HOME/fmstack, else ~/.cache/fmstack."""
    explicit = os.environ.get("FMSTACK_CACHE_DIR") or os.environ.get("FMSTACK_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fmstack"
