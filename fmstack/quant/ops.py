"""Weight-only quantized matmul kernels: the one module that knows which native op each torch
version and device provides, and how it wants its weights packed.

int8: `aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) = x @ (w * scales).T`
      (CPU and CUDA; scales in the activation dtype).
int4: group-wise asymmetric, value = (q - 8) * scale + zero for q in 0..15.
      CPU:  `_convert_weight_to_int4pack_for_cpu(q int32 [N, K])` + `_weight_int4pack_mm_for_cpu`
      CUDA: `_convert_weight_to_int4pack(q packed uint8 [N, K/2])` + `_weight_int4pack_mm` (bf16 only)
      Both take `scales_and_zeros [K/G, N, 2]`.
When a device has no native op, the weight is dequantized inside the (compiled) graph so Inductor
can fuse the dequantization into the matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

aten = torch.ops.aten

INT4_INNER_K_TILES = 2  # K must be a multiple of 16 * this for the CUDA packer


def has_native_int4(device: torch.device) -> bool:
    if device.type == "cpu":
        return hasattr(aten, "_weight_int4pack_mm_for_cpu")
    return device.type == "cuda" and hasattr(aten, "_weight_int4pack_mm")


def int8_mm(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x `[M, K]` (fp), weight int8 `[N, K]`, scales `[N]` -> `[M, N]` in x's dtype."""
    x = x.contiguous()  # the native kernels need dense rows (x may be a strided last-position slice)
    if hasattr(aten, "_weight_int8pack_mm") and x.device.type in ("cpu", "cuda"):
        return aten._weight_int8pack_mm(x, weight, scales.to(x.dtype))
    return x @ (weight.to(x.dtype) * scales.to(x.dtype)[:, None]).T


def pack_uint4(q: Tensor) -> Tensor:
    """q `[N, K]` values 0..15 -> uint8 `[N, K/2]`, two per byte (even column in the high nibble)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_uint4(packed: Tensor) -> Tensor:
    """uint8 `[N, K/2]` -> uint8 `[N, K]` values 0..15 (inverse of `pack_uint4`)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


def int4_prepare(q: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Portable int4 (q uint8 `[N, K]`, scales/zeros `[N, K/G]`) -> what the device's kernel consumes:
    (packed weight, scales_and_zeros `[K/G, N, 2]` in `dtype`). Falls back to (q, same) on devices
    without a native kernel."""
    device = q.device
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
    if device.type == "cpu" and has_native_int4(device):
        return aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INT4_INNER_K_TILES), sz
    if device.type == "cuda" and has_native_int4(device):
        return aten._convert_weight_to_int4pack(pack_uint4(q).contiguous(), INT4_INNER_K_TILES), sz
    return q, sz


def int4_mm(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """x `[M, K]` -> `[M, N]` with a weight from `int4_prepare`."""
    x = x.contiguous()
    if x.device.type == "cpu" and has_native_int4(x.device):
        return aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros.to(x.dtype))
    if x.device.type == "cuda" and has_native_int4(x.device):
        out = aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, group_size,
                                       scales_and_zeros.to(torch.bfloat16))
        return out.to(x.dtype)
    n, k = packed.shape
    w = packed.to(x.dtype).view(n, k // group_size, group_size) - 8
    sz = scales_and_zeros.to(x.dtype)
    w = w * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
    return x @ w.view(n, k).T
