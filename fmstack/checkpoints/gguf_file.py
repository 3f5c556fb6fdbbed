"""The GGUF container (header, key/values, tensor table, memory-mapped data), parsed directly.

Why not `gguf.GGUFReader`: it builds a numpy memmap view for every part of every field, several per
vocabulary string, so opening SmolLM2-135M (49k tokens + 48k merges) made ~1M numpy views and took
4-9 s on the shared 2-core dev machine (cProfile: 15.5 s of 16.0 s in `_build_fields`/
`memmap.__array_finalize__` at load average ~3). Reading the same header with `struct` takes ~0.1 s.

Only little-endian GGUF v2/v3 files are read (what llama.cpp writes on every current platform).
The data section is mapped copy-on-write (`mmap.ACCESS_COPY`): tensors are zero-copy uint8 torch
views, and a writable mapping needs no read-only-buffer warning; nothing ever writes to it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from torch import Tensor

from fmstack.errors import CheckpointError

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8

# GGUF value type -> struct format of one scalar (8: string, 9: array are handled apart)
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class _Corrupt(Exception):
    """A header that runs past the end of the file or holds impossible values."""


class _Unsupported(Exception):
    """A well-formed header this reader does not handle (another GGUF version, big-endian)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: QT
    shape: tuple[int, ...]  # torch order (ggml lists dims innermost first)
    data_offset: int  # from the start of the file
    n_bytes: int


class GGUFFile:
    """An opened GGUF file: `fields` (every key/value as plain Python values, the `GGUF.*` header
    counts included), `tensors` (in file order) and `raw(t)`, a tensor's bytes as a uint8 view."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError(f"{path}: not a valid GGUF file (bad magic: does not start with 'GGUF')")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            self.fields, self.tensors = _parse(self._mm, path)
        except (_Corrupt, struct.error, ValueError, IndexError, OverflowError) as e:
            raise CheckpointError(f"{path}: not a valid GGUF file (truncated or corrupt, {len(self._mm)} bytes: "
                                  f"{type(e).__name__}: {e})") from None
        except _Unsupported as e:
            raise CheckpointError(f"{path}: unsupported GGUF file ({e})") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: corrupt GGUF metadata (bad UTF-8: {e})") from None

    def raw(self, t: TensorInfo) -> Tensor:
        """The bytes of tensor `t` as a 1-D uint8 tensor viewing the mapped file (no copy)."""
        if t.n_bytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=t.n_bytes, offset=t.data_offset)

    def release(self, t: TensorInfo) -> None:
        """Drop the file pages of a tensor already read, so the mapping does not add to peak RSS."""
        if not hasattr(self._mm, "madvise"):
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
        except (OSError, ValueError, AttributeError):
            pass  # an optimisation only


class _Cursor:
    """Sequential little-endian reads from the mapped header; reading past the end raises _Corrupt."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.off, self.size = buf, 0, len(buf)

    def take(self, n: int) -> int:
        start = self.off
        self.off += n
        if n < 0 or self.off > self.size:
            raise _Corrupt(f"header runs past the end of the file at byte {start} (+{n})")
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return self.buf[start:start + n].decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise _Corrupt(f"unknown value type {vtype}")
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def array(self) -> list:
        vtype, count = self.u32(), self.u64()
        if vtype == _STRING:
            return [self.string() for _ in range(count)]
        if vtype == _ARRAY:
            return [self.array() for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise _Corrupt(f"unknown array item type {vtype}")
        dtype = np.dtype(fmt.replace("?", "b1"))
        start = self.take(count * dtype.itemsize)
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).tolist()


def _parse(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Header, key/values and tensor table; every tensor's extent is checked against the file size."""
    cur = _Cursor(buf)
    cur.take(4)  # magic, checked by the caller
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise _Unsupported("big-endian; only little-endian GGUF files are read")
        raise _Unsupported(f"version {version}; supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors, n_kv = cur.u64(), cur.u64()
    fields: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = cur.string()
        fields[key] = cur.value(cur.u32())
    table = [_tensor_entry(cur) for _ in range(n_tensors)]
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment={alignment!r} is not a positive power of two")
    data_start = -(-cur.off // alignment) * alignment
    tensors = []
    for name, qtype, shape, offset, n_bytes in table:
        t = TensorInfo(name, qtype, shape, data_start + offset, n_bytes)
        if t.data_offset + n_bytes > cur.size:
            raise _Corrupt(f"tensor {name} ends at byte {t.data_offset + n_bytes}, past the end of the file")
        tensors.append(t)
    return fields, tensors


def _tensor_entry(cur: _Cursor) -> tuple[str, QT, tuple[int, ...], int, int]:
    name = cur.string()
    n_dims = cur.u32()
    if n_dims > MAX_DIMS:
        raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
    dims = [cur.u64() for _ in range(n_dims)]
    qtype = QT(cur.u32())  # ValueError for an unknown type number
    offset = cur.u64()
    block, type_size = GGML_QUANT_SIZES[qtype]
    if dims and dims[0] % block:
        raise _Corrupt(f"tensor {name}: row length {dims[0]} is not a multiple of {qtype.name}'s block of {block}")
    n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
    return name, qtype, tuple(reversed(dims)), offset, n_bytes
