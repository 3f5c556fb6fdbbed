"""Private aten kernels fmstack calls: the weight-only quantized matmuls (tinygemm int4, the int8
pack matmul) and CPU flash attention with its log-sum-exp. Each call site first asks whether the
kernel exists for the device (`has_kernel`: the op is registered for that dispatch key, on a
verified torch); the callers' public fallbacks take over where it does not."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fmstack.backends.gate import symbol

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what tinygemm accepts


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether the private aten op `op` (e.g. "_weight_int8pack_mm") is usable on `device`'s dispatch
    key: present in this (verified) torch and registered for that backend."""
    device = torch.device(device)
    has = symbol("C.dispatch_has_kernel")
    if has is None or symbol(f"aten.{op}") is None:
        return False
    return bool(has(f"aten::{op}", device.type.upper()))


def int8pack_mm(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """`aten._weight_int8pack_mm`: x `[M, K]` (dense rows) @ int8 weight `[N, K]`.T * scales `[N]`
    (x's dtype); only where `has_kernel("_weight_int8pack_mm", x.device)`."""
    return symbol("aten._weight_int8pack_mm")(x, weight, scales)


def int4_inner_k_tiles(k: int) -> int | None:
    """tinygemm's `inner_k_tiles` for an input width K: 8 where K % 128 == 0 (the fastest layout), else
    the largest of 4, 2 whose 16-column tiles divide K; None where none does (no tinygemm)."""
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    return None


def tinygemm_fits(n: int, k: int, group_size: int) -> bool:
    """Whether a `[N, K]` int4 weight in groups of `group_size` has a tinygemm layout: N a multiple
    of 8 (its output tiles), K tileable (`int4_inner_k_tiles`), a supported group size."""
    return n % 8 == 0 and int4_inner_k_tiles(k) is not None and group_size in INT4_GROUP_SIZES


def int4pack_convert(packed: Tensor, inner_k_tiles: int) -> Tensor:
    """`aten._convert_weight_to_int4pack`: uint8 `[N, K/2]` (two values per byte, even column high)
    -> tinygemm's int32 layout."""
    return symbol("aten._convert_weight_to_int4pack")(packed.contiguous(), inner_k_tiles)


def int4pack_mm(x: Tensor, weight: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
    """`aten._weight_int4pack_mm` (tinygemm): bf16 x `[M, K]` @ a `int4pack_convert` weight, with
    bf16 `scales_and_zeros [K/G, N, 2]` -> bf16 `[M, N]`."""
    return symbol("aten._weight_int4pack_mm")(x, weight, group_size, scales_and_zeros)


def cpu_flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Unmasked attention of q `[B, H, Tq, D]` over k/v `[B, H, Tk, D]` (`causal`: query i sees keys
    <= i, Tq == Tk) -> (out `[B, H, Tq, D]`, natural-log log-sum-exp of the scores `[B, H, Tq]`).
    The fused CPU flash kernel where available (it returns the lse, which public SDPA does not);
    otherwise SDPA for the output and the scores' logsumexp computed alongside."""
    op = symbol("aten._scaled_dot_product_flash_attention_for_cpu")
    if op is not None:
        out, lse = op(q, k, v, 0.0, causal)
        return out, lse
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        hidden = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, -math.inf)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal), torch.logsumexp(scores, dim=-1)
