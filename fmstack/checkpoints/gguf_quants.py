"""GGUF block dequantization in torch, bit-exact with `gguf.quants.dequantize`.

Why: the `gguf` package dequantizes in numpy through `np.array_split`/`hsplit` per row group; for
SmolLM2-135M Q4_1 that was 7.0 s of the 7.8 s of reading the tensors (cProfile, shared 2-core machine,
load average ~3). Here each block type is a few whole-tensor integer ops writing straight into the
float32 output, in chunks of CHUNK_BLOCKS blocks so the temporaries stay around a megabyte.

Implemented: F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (the default model uses Q4_1, Q8_0
and F32). Other types the `gguf` package knows (K-quants, IQ*) go through it, as before. Each
implemented type is checked against `gguf.quants.dequantize` on random blocks
(tests/checkpoints/test_gguf.py); the arithmetic is the package's, op for op, so results are equal
to the bit.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from torch import Tensor

from fmstack.checkpoints.base import one_intraop_thread

CHUNK_BLOCKS = 1 << 15  # blocks dequantized at a time: ~1M values, temporaries ~1 MB


def _f16(b: Tensor, start: int) -> Tensor:
    """The float16 at byte `start` of each block, as float32 `[n, 1]`."""
    return b[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """`[n, 16]` packed bytes -> `[n, 32]` uint8: low nibbles first, then high (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _high_bits(qh: Tensor) -> Tensor:
    """`[n, 4]` little-endian uint32 bit masks -> `[n, 32]` uint8 with bit i of element i shifted to 0x10."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return (((qh.unsqueeze(-1) >> shifts) & 1) << 4).reshape(qh.shape[0], 32)


def _q4_0(b: Tensor, out: Tensor) -> None:
    out.copy_(_nibbles(b[:, 2:])).sub_(8).mul_(_f16(b, 0))


def _q4_1(b: Tensor, out: Tensor) -> None:
    out.copy_(_nibbles(b[:, 4:])).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: Tensor, out: Tensor) -> None:
    out.copy_(_nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])).sub_(16).mul_(_f16(b, 0))


def _q5_1(b: Tensor, out: Tensor) -> None:
    out.copy_(_nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q8_0(b: Tensor, out: Tensor) -> None:
    out.copy_(b[:, 2:].view(torch.int8)).mul_(_f16(b, 0))


def _plain(dtype: torch.dtype) -> Callable[[Tensor, Tensor], None]:
    def convert(b: Tensor, out: Tensor) -> None:
        out.copy_(b.contiguous().view(dtype).reshape(out.shape))
    return convert


def _bf16(b: Tensor, out: Tensor) -> None:
    out.view(torch.int32).copy_(b.contiguous().view(torch.int16)).bitwise_left_shift_(16)


# type -> fn(blocks uint8 [n, type_size], out float32 [n, block_size]) writing the values into out
TORCH_DEQUANT: dict[QT, Callable[[Tensor, Tensor], None]] = {
    QT.F32: _plain(torch.float32), QT.F16: _plain(torch.float16), QT.F64: _plain(torch.float64),
    QT.BF16: _bf16, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0,
}


def can_dequantize(qtype: QT) -> bool:
    """Whether `dequantize` handles `qtype`: here in torch, or by the `gguf` package."""
    traits = getattr(gguf.quants, "_type_traits", None)  # private; if it moves, let dequantize() decide
    return qtype in TORCH_DEQUANT or traits is None or qtype in traits


def dequantize(raw: Tensor, qtype: QT, shape: tuple[int, ...]) -> Tensor:
    """The bytes of one tensor (1-D uint8) -> float32 tensor of `shape`.

    Raises NotImplementedError for a type neither this module nor the `gguf` package dequantizes."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    out = torch.empty(shape, dtype=torch.float32)
    flat_out = out.view(-1, block)
    blocks = raw.view(-1, type_size)
    fn = TORCH_DEQUANT.get(qtype, _with_gguf(qtype))
    with one_intraop_thread():
        for b0 in range(0, blocks.shape[0], CHUNK_BLOCKS):
            fn(blocks[b0:b0 + CHUNK_BLOCKS], flat_out[b0:b0 + CHUNK_BLOCKS])
    return out


def _with_gguf(qtype: QT) -> Callable[[Tensor, Tensor], None]:
    """The `gguf` package's numpy dequantizer for a type not implemented here."""
    def convert(b: Tensor, out: Tensor) -> None:
        values = gguf.quants.dequantize(b.numpy(), qtype)
        out.copy_(torch.from_numpy(np.ascontiguousarray(values)).reshape(out.shape))
    return convert
