"""Weight-only quantized matmuls: the one module that knows which kernel each device (and torch
version) gets and how it wants its weights laid out. Every function computes `x @ dequant(W).T`.

int8 (`w ~= q * scale`, q int8 `[N, K]`, scales `[N]`):
  CUDA                 `F.linear(x, q.to(x.dtype)) * scales`: inside a compiled model Inductor fuses the
                       conversion into the matmul (an M=1 one becomes a fused reduction with
                       coordinate-descent tuning); `_weight_int8pack_mm`'s CUDA kernel is a naive loop.
  other accelerators   the native `_weight_int8pack_mm` where the device has a kernel for it, else as CUDA.
  CPU, <= 16 rows      `(x * q).sum(-1) * scales`, one reduction per row of x, which Inductor emits
                       as one vectorized pass over the int8 weight with an accumulator per row of x
                       (decode, speculative verification).
  CPU, more rows       `F.linear(x, q.to(x.dtype)) * scales` (BLAS).
int4 (group-wise asymmetric: value = (q - 8) * scale + zero, q in 0..15, groups of G input columns;
      `scales_and_zeros [K/G, N, 2]`):
  CUDA                 tinygemm: `_convert_weight_to_int4pack` + `_weight_int4pack_mm` (bf16), with
                       `inner_k_tiles` 8 where K % 128 == 0 (else 4 or 2) and scales/zeros stored in
                       bf16 at pack time; an N not divisible by 8 (or an untileable K) takes the
                       unpacked layout below.
  CPU                  "group-planar" bytes `[N, K/G, G/2]`: byte j of group g holds q[g*G + j] in its
                       high nibble and q[g*G + G/2 + j] in its low nibble, so both nibbles of a byte
                       meet contiguous activations. <= 16 rows: a fused reduction over the packed
                       bytes; more rows: dequantize + BLAS. scales/zeros stay fp32.
  other devices        unpacked q `[N, K]`, dequantize + matmul (scales/zeros in the activation dtype).
`int4_mm` tells the layouts apart by the weight's rank: 4 (tinygemm), 3 (planar), 2 (unpacked).
The CPU kernels are written for Inductor: inside a compiled model they fuse into its graph, and eager
callers get them compiled once per process (`_cpu_kernel`). The private kernels are reached through
`fmstack.backends` (which checks they exist for the device).

Why not the native CPU ops: on the AMD EPYC machine we measured (torch 2.13, 2 threads, 30 layers of
SmolLM2-135M projections), `_weight_int8pack_mm` took 50 ms per pass for one row (2.1 GB/s; the fused
reduction: ~10 ms) and 5.7 s for 128 rows (BLAS on the converted weight: ~0.3 s), and
`_weight_int4pack_mm_for_cpu` 97 ms for one row (the planar reduction: ~14 ms) and 12 s for 128 rows.
`python benchmarks/quant_kernels.py` measures each choice.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fmstack.backends import LoggedCompile, has_kernel, rowwise
from fmstack.backends import kernels

log = logging.getLogger(__name__)

# CPU: matmuls with at most this many rows stream the quantized weight in a fused reduction, more rows
# dequantize and use BLAS (the crossover measured by benchmarks/quant_kernels.py --rows 1,2,4,8,16)
REDUCTION_MAX_ROWS = 16


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def has_native_int4(device: torch.device) -> bool:
    """Whether `device` runs int4 through a native (tinygemm) kernel; only CUDA does here, where this
    torch has the packer and the matmul for it."""
    return (device.type == "cuda" and has_kernel("_weight_int4pack_mm", device)
            and has_kernel("_convert_weight_to_int4pack", device))


# -- int8 -----------------------------------------------------------------------------------------

def _few_rows(x: Tensor, specialize: bool) -> bool:
    """Whether x `[M, K]` takes the reduction. A symbolic M (a compiled prefill of any length) takes
    BLAS without adding a guard, unless `specialize` (the eager kernels: one graph per side)."""
    if specialize:
        return x.shape[0] <= REDUCTION_MAX_ROWS
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(x.shape[0] <= REDUCTION_MAX_ROWS)


def _int8_cpu(x: Tensor, weight: Tensor, scales: Tensor, specialize: bool = False) -> Tensor:
    if _few_rows(x, specialize):  # a streaming reduction over the int8 rows, once Inductor fuses it
        def gemv(rows: Tensor) -> Tensor:
            return (rows.float()[:, None, :] * weight.float()[None]).sum(-1)
        acc = rowwise(gemv, x) if _compiling() else gemv(x)
        return (acc * scales.float()).to(x.dtype)
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


def int8_kernel(device: torch.device) -> str:
    """Which int8 matmul `device` gets (see the module docstring): "reduction" (CPU), "native"
    (`_weight_int8pack_mm`, on a non-CUDA accelerator with a kernel for it) or "linear"."""
    if device.type == "cpu":
        return "reduction"
    if device.type != "cuda" and has_kernel("_weight_int8pack_mm", device):
        return "native"
    return "linear"


def int8_mm(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x `[M, K]` (fp), weight int8 `[N, K]`, scales `[N]` -> `[M, N]` in x's dtype."""
    kind = int8_kernel(x.device)
    if kind == "reduction":
        return _cpu_kernel(_int8_cpu)(x, weight, scales)
    if kind == "native":  # the native kernel needs dense rows (x may be a strided last-position slice)
        return kernels.int8pack_mm(x.contiguous(), weight, scales.to(x.dtype))
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


# -- int4 -----------------------------------------------------------------------------------------

def pack_uint4(q: Tensor) -> Tensor:
    """q `[N, K]` values 0..15 -> uint8 `[N, K/2]`, two per byte (even column in the high nibble).
    This is the portable (checkpoint) packing."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_uint4(packed: Tensor) -> Tensor:
    """uint8 `[N, K/2]` -> uint8 `[N, K]` values 0..15 (inverse of `pack_uint4`)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


def pack_group_planar(q: Tensor, group_size: int) -> Tensor:
    """q `[N, K]` values 0..15 -> uint8 `[N, K/G, G/2]` (the CPU layout, see the module docstring)."""
    n, k = q.shape
    q4 = q.to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    return (q4[:, :, 0] << 4) | q4[:, :, 1]


def unpack_group_planar(packed: Tensor) -> Tensor:
    """uint8 `[N, K/G, G/2]` -> uint8 `[N, K]` values 0..15 (inverse of `pack_group_planar`)."""
    return torch.cat([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


INT4_LAYOUTS = ("planar", "tinygemm", "unpacked")


def int4_layout(device: torch.device, n: int, k: int, group_size: int) -> str:
    """The int4 layout `device` gets for a `[N, K]` weight (see the module docstring)."""
    if device.type == "cpu":
        return "planar"
    if has_native_int4(device) and kernels.tinygemm_fits(n, k, group_size):
        return "tinygemm"
    return "unpacked"


def int4_prepare(q: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype,
                 layout: str | None = None) -> tuple[Tensor, Tensor]:
    """Portable int4 (q uint8 `[N, K]`, scales/zeros `[N, K/G]`) -> what the device's kernel consumes:
    (weight in `layout`, default `int4_layout`'s choice; scales_and_zeros `[K/G, N, 2]`: fp32 for
    planar, bf16 for tinygemm, `dtype` unpacked)."""
    (n, k), group_size = q.shape, q.shape[1] // scales.shape[1]
    layout = layout or int4_layout(q.device, n, k, group_size)
    if layout not in INT4_LAYOUTS:
        raise ValueError(f"int4 layout {layout!r} is unknown; choose one of {', '.join(INT4_LAYOUTS)}")
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    if layout == "planar":
        return pack_group_planar(q, group_size), sz.float()
    if layout == "tinygemm":
        packed = kernels.int4pack_convert(pack_uint4(q), kernels.int4_inner_k_tiles(k))
        return packed, sz.to(torch.bfloat16)
    return q.to(torch.uint8), sz.to(dtype)


def _planar_dequantize(packed: Tensor, scales_and_zeros: Tensor, dtype: torch.dtype) -> Tensor:
    """`[N, K/G, G/2]` planar bytes -> the weight `[N, K]` in `dtype`."""
    n = packed.shape[0]
    q = torch.cat([packed >> 4, packed & 0xF], dim=-1).float() - 8.0  # [N, K/G, G]
    s, z = scales_and_zeros[..., 0].T.float(), scales_and_zeros[..., 1].T.float()  # [N, K/G]
    return (q * s[..., None] + z[..., None]).reshape(n, -1).to(dtype)


def _planar_gemv(x: Tensor, packed: Tensor, scales_and_zeros: Tensor) -> Tensor:
    """x `[M, K]` (few rows) -> `[M, N]` straight from the planar bytes: per group g,
    sum_j x_hi[j] q_hi[j] s + x_lo[j] q_lo[j] s + (x_hi[j] + x_lo[j]) (z - 8 s)."""
    n, groups, half = packed.shape
    xg = x.float().reshape(x.shape[0], 1, groups, 2, half)
    x_hi, x_lo = xg[:, :, :, 0], xg[:, :, :, 1]  # [M, 1, K/G, G/2]: the activations of each byte's nibbles
    s = scales_and_zeros[..., 0].T.float()[..., None]  # [N, K/G, 1]
    z8 = scales_and_zeros[..., 1].T.float()[..., None] - 8.0 * s
    hi, lo = (packed >> 4).float(), (packed & 0xF).float()
    out = ((hi * x_hi + lo * x_lo) * s + (x_hi + x_lo) * z8).sum((-2, -1))
    return out.to(x.dtype)


def _int4_cpu(x: Tensor, weight: Tensor, scales_and_zeros: Tensor, specialize: bool = False) -> Tensor:
    if _few_rows(x, specialize):
        def gemv(rows: Tensor) -> Tensor:
            return _planar_gemv(rows, weight, scales_and_zeros)
        return rowwise(gemv, x) if _compiling() else gemv(x)
    return F.linear(x, _planar_dequantize(weight, scales_and_zeros, x.dtype))


def int4_mm(x: Tensor, weight: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """x `[M, K]` -> `[M, N]` with a weight from `int4_prepare` (its layout told by its rank)."""
    if weight.dim() == 3:  # planar (CPU)
        return _cpu_kernel(_int4_cpu)(x, weight, scales_and_zeros)
    if weight.dim() == 4:  # tinygemm; scales_and_zeros are bf16 since int4_prepare
        return kernels.int4pack_mm(x.contiguous().to(torch.bfloat16), weight, group_size, scales_and_zeros).to(x.dtype)
    n, k = weight.shape
    w = weight.to(x.dtype).view(n, k // group_size, group_size) - 8
    sz = scales_and_zeros.to(x.dtype)
    w = w * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
    return x @ w.view(n, k).T


# -- CPU kernels for eager callers ----------------------------------------------------------------

def _rows_label(rows: int) -> str:  # the two graphs of an eager kernel: reduction or BLAS
    return f"<= {REDUCTION_MAX_ROWS} rows" if rows <= REDUCTION_MAX_ROWS else f"> {REDUCTION_MAX_ROWS} rows"


_compiled_kernels: dict[Callable, Callable] = {}
_compile_failed = False


def _cpu_kernel(fn: Callable) -> Callable:
    """`fn` itself inside torch.compile (Inductor fuses it into the surrounding graph); for eager
    callers, `fn` compiled once per process with dynamic shapes (seconds; Inductor's FX graph cache
    keeps it on disk), because run op by op the dequantization makes several full-size passes over
    the weight. Falls back to plain eager, with one warning, where Inductor cannot compile (no C++
    compiler)."""
    global _compile_failed
    if _compiling() or _compile_failed:
        return fn
    kernel = _compiled_kernels.get(fn)
    if kernel is None:
        kernel = _compiled_kernels[fn] = LoggedCompile(
            lambda *a: fn(*a, specialize=True), f"quantized CPU kernel {fn.__name__}", dynamic=True,
            fullgraph=True, key=lambda args: (_rows_label(args[0].shape[0]),))

    def run(*args: Tensor) -> Tensor:
        global _compile_failed
        try:
            return kernel(*args)
        except Exception as e:  # noqa: BLE001 - e.g. Inductor's InvalidCxxCompiler
            if _compile_failed:
                raise
            _compile_failed = True
            log.warning("quantized CPU kernels run uncompiled (slow): torch.compile failed: %s", e)
            return fn(*args)
    return run
