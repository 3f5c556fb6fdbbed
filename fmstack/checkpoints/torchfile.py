"""Reading pickled PyTorch files (`.pth` / `.pt`: Meta checkpoints, fine-tuning resume state) safely,
with one-line errors.

Every such file is read with `torch.load(weights_only=True)`: its restricted unpickler accepts only
tensors and plain containers and refuses any other global *before* calling it, so a file carrying
a `__reduce__` payload is rejected without running it (tested for the zip and the legacy
`_use_new_zipfile_serialization=False` formats). That refusal is reported as such, naming the global
it asked for, and not as a truncated or corrupt file: the fix differs (trust and re-save, not
re-download)."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from fmstack.errors import CheckpointError

_REFUSED = "Weights only load failed"
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)")
_OBJECT = ("Can only build Tensor", "Can only create new object")  # instances of classes not allowed
READ_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError,
               AttributeError, ImportError, IndexError, zipfile.BadZipFile)


class UnsafePickleError(CheckpointError):
    """`torch.load(weights_only=True)` refused the file's pickle: it asks for code to be run."""


def refused_as_unsafe(error: BaseException) -> str | None:
    """What the weights-only unpickler refused as unsafe (e.g. 'GLOBAL os.system'), when `error` is
    that refusal; None for any other error, including the unpickler's reports of bytes that are
    no valid pickle (e.g. 'Unsupported operand': a corrupt file)."""
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) or _REFUSED not in text:
        return None
    found = _GLOBAL.search(text)
    if found is not None:
        return f"GLOBAL {found.group(1)}"
    if any(marker in text for marker in _OBJECT):
        return "an instance of a class other than tensors and plain containers"
    return None


def first_line(error: BaseException) -> str:
    """The error's first line (first sentence), for one-line messages; for the weights-only
    unpickler's many-line report, its own error line (e.g. 'Unsupported operand 103')."""
    text = str(error).strip()
    inner = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if inner is not None:
        text = inner.group(1)
    return (text.splitlines() or [type(error).__name__])[0].split(". ")[0]


def load_torch_file(file: Path, mmap: bool = False) -> Any:
    """`torch.load(file, weights_only=True)` on the CPU (memory-mapped with `mmap`; zip format only).
    Raises `UnsafePickleError` when the pickle asks for anything but tensors and plain containers,
    CheckpointError (truncated or corrupt) when it cannot be read."""
    try:
        return torch.load(file, weights_only=True, mmap=mmap, map_location="cpu")
    except READ_ERRORS as e:
        refused = refused_as_unsafe(e)
        if refused is not None:
            raise UnsafePickleError(
                f"{file}: refused to load as unsafe: its pickle asks for {refused}, which could run code; "
                "fmstack reads .pth/.pt files with torch.load(weights_only=True), which allows only tensors "
                "and plain containers, and ran nothing from it (re-save it from a trusted source with "
                "tensors only)") from None
        raise CheckpointError(f"{file}: cannot load PyTorch checkpoint (truncated or corrupt: {first_line(e)})") \
            from None
