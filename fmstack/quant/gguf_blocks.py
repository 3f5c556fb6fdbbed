"""GGUF quantized tensors -> `BlockWeight`, with no requantization: the block values stay exactly
what llama.cpp's dequantizer (and `gguf.quants.dequantize`) computes.

Why: dequantizing the default model (SmolLM2-135M, Q4_1/Q8_0, 94 MB on disk) to float32 held 513 MiB
of weights; kept as blocks it holds 92 MiB, about its file size (RSS figures in `fmstack.loading`).

Per type (K = a row's width; `value` = q * scale + min, the block layout of `fmstack.quant.blocks`):
  Q8_0  int8 q, fp16 d as stored: 8-bit, block 32, fp16 scales, no mins.
  Q4_0  nibbles as stored (ggml's order is the layout's), fp16 d; value (q - 8) * d, so
        mins = -8 * d (exact in fp16 unless that overflows; then scales and mins are kept in fp32).
  Q4_1  nibbles, fp16 d and m: all three copied as they are.
  Q4_K  256-value super-blocks of eight 32-blocks, 6-bit sub-scales sc and mins m:
        value = (d * sc) * q - dmin * m -> 4-bit block 32, scales d*sc, mins -(dmin*m) in fp32 (both
        products exact); the nibbles are reordered from ggml's per-64 order to the layout's per-32 order.
  Q5_K  as Q4_K with a fifth bit per value -> int8 q 0..31 (8-bit block 32), fp32 scales and mins.
  Q6_K  sixteen 16-blocks, int8 sub-scales: value = (d * sc) * (q - 32) -> int8 q - 32, 8-bit block
        16, fp32 scales d*sc, no mins.
Each is checked bit for bit against `gguf.quants.dequantize` on random blocks (tests/quant/test_blocks.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from torch import Tensor

from fmstack.quant.blocks import BlockWeight, pack_nibbles

# one converter's output for n blocks: (q [n, values] or packed nibbles [n, values/2],
# scales [n, sub-blocks], mins or None, bits, block)
Parts = tuple[Tensor, Tensor, Tensor | None, int, int]


def _f16(b: Tensor, start: int) -> Tensor:
    """The float16 at byte `start` of each block `[n, 1]`."""
    return b[:, start:start + 2].contiguous().view(torch.float16)


def _q8_0(b: Tensor) -> Parts:
    return b[:, 2:].contiguous().view(torch.int8), _f16(b, 0), None, 8, 32


def _q4_0(b: Tensor) -> Parts:
    d = _f16(b, 0)
    mins = -8.0 * d.float()
    if torch.equal(mins.half().float(), mins):
        return b[:, 2:], d, mins.half(), 4, 32
    return b[:, 2:], d.float(), mins, 4, 32


def _q4_1(b: Tensor) -> Parts:
    return b[:, 4:], _f16(b, 0), _f16(b, 2), 4, 32


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> 6-bit sub-scales and mins, each `[n, 8]`:
    bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales/mins 4-7 are the low/high nibbles of
    bytes 8-11 with their top two bits in the top bits of bytes 0-3 / 4-7."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: (scales d*sc, mins -(dmin*m)), float32 `[n, 8]`."""
    sc, mn = _k_scale_min(b[:, 4:16])
    return _f16(b, 0).float() * sc.float(), -(_f16(b, 2).float() * mn.float())


def _k_low_nibbles(qs: Tensor) -> Tensor:
    """`[n, 128]` bytes -> `[n, 256]` values 0..15: each 32 bytes give 64 values, low nibbles first."""
    n = qs.shape[0]
    return torch.stack([qs.reshape(n, 4, 32) & 0x0F, qs.reshape(n, 4, 32) >> 4], dim=2).reshape(n, 256)


def _q4_k(b: Tensor) -> Parts:
    scales, mins = _k_scales(b)
    return pack_nibbles(_k_low_nibbles(b[:, 16:144])), scales, mins, 4, 32


def _q5_k(b: Tensor) -> Parts:
    scales, mins = _k_scales(b)
    n = b.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    high = ((b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1).reshape(n, 256)  # bit i of byte j: value 32i + j
    q = _k_low_nibbles(b[:, 48:176]) | (high << 4)
    return q.view(torch.int8), scales, mins, 8, 32


def _q6_k(b: Tensor) -> Parts:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)
    low = torch.stack([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8).reshape(n, 256)
    scales = _f16(b, 208).float() * b[:, 192:208].contiguous().view(torch.int8).float()
    return q, scales, None, 8, 16


CONVERTERS: dict[QT, Callable[[Tensor], Parts]] = {
    QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
}


def keeps_blocks(qtype: QT) -> bool:
    """Whether a tensor of `qtype` is kept as blocks (the other types are float or dequantized)."""
    return qtype in CONVERTERS


def gguf_block_weight(raw: Tensor, qtype: QT, shape: tuple[int, int]) -> BlockWeight:
    """The bytes of one GGUF matrix (1-D uint8, `shape` = `[rows, cols]` in torch order) -> BlockWeight.
    Raises ValueError for a type not in CONVERTERS or bytes that do not fit `shape`."""
    if qtype not in CONVERTERS:
        raise ValueError(f"GGUF type {qtype.name} is not kept as blocks (kept: "
                         f"{', '.join(t.name for t in CONVERTERS)})")
    rows, cols = shape
    values, size = GGML_QUANT_SIZES[qtype]
    if cols % values or raw.numel() != rows * cols // values * size:
        raise ValueError(f"{raw.numel()} bytes of {qtype.name} do not hold a [{rows}, {cols}] matrix")
    q, scales, mins, bits, block = CONVERTERS[qtype](raw.view(-1, size))
    q = q.reshape(rows, -1).clone()  # own storage: the raw bytes are a view of the mapped file
    scales = scales.reshape(rows, -1).clone()
    mins = None if mins is None else mins.reshape(rows, -1).clone()
    return BlockWeight(q, scales, mins, bits, block)
