"""Round-to-nearest weight quantizers and the quantized Linear modules that replace `nn.Linear`.

Portable (saved) forms, independent of torch version and device:
  int8: qweight int8 `[N, K]`, scales `[N]` (symmetric per output channel: w ~= q * scale)
  int4: qweight uint8 `[N, K/2]` (two 4-bit values per byte), scales/zeros `[N, K/G]`
        (asymmetric per group of G input columns: w ~= (q - 8) * scale + zero, q in 0..15)
Modules hold the device kernel's packed form (see `ops.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmstack.quant import ops

GROUP_SIZES = (32, 64, 128, 256)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w `[N, K]` -> (q int8 `[N, K]`, scales fp32 `[N]`); stacked experts `[E, N, K]` -> scales `[E, N]`."""
    w = w.float()
    scales = (w.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_params(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Per-group (scale, zero) `[N, K/G]` from the group's min/max: 0..15 spans [min, max]."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp_min(1e-8)
    zeros = lo + 8.0 * scales
    return scales, zeros


def quantize_int4_with(w: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """w `[N, K]` with given group params -> q uint8 `[N, K]` in 0..15."""
    n = w.shape[0]
    g = w.float().reshape(n, -1, group_size)
    q = torch.round((g - zeros[..., None]) / scales[..., None] + 8.0).clamp(0, 15)
    return q.reshape(n, -1).to(torch.uint8)


def dequantize_int4(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """q uint8 `[N, K]` -> fp32 `[N, K]`."""
    n = q.shape[0]
    g = q.float().reshape(n, -1, group_size) - 8.0
    return (g * scales[..., None] + zeros[..., None]).reshape(n, -1)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    def from_portable(cls, qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> "Int8Linear":
        m = cls(qweight.shape[1], qweight.shape[0], dtype, device=qweight.device)
        m.weight.copy_(qweight)
        m.scales.copy_(scales)
        return m

    def forward(self, x: Tensor) -> Tensor:
        out = ops.int8_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, in_features: int, out_features: int,
                 group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_portable(cls, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                      dtype: torch.dtype) -> "Int4Linear":
        q = ops.unpack_uint4(qweight)
        packed, sz = ops.int4_prepare(q, scales.float(), zeros.float(), dtype)
        return cls(packed, sz, q.shape[1], q.shape[0], group_size)

    def forward(self, x: Tensor) -> Tensor:
        out = ops.int4_mm(x.reshape(-1, self.in_features), self.weight, self.scales_and_zeros, self.group_size)
        return out.reshape(*x.shape[:-1], self.out_features)
