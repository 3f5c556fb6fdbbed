"""Every private torch internal fmstack uses, in one fenced package (`torch._inductor`,
`torch._dynamo`, `torch._functorch`, `torch._C`, private aten ops, Inductor prims). Nothing outside
`fmstack/backends/` touches them (`tests/test_backends.py` scans for it), so a torch upgrade is
checked here, against `gate.VERIFIED_TORCH`: on another torch release, or where a symbol is gone,
each piece falls back to stock `torch.compile` or public ops with one logged warning instead of
crashing (see `gate.py`).

Why the private pieces at all: the CPU decode backend streams weights through Inductor reductions
instead of MKL's sgemv (SmolLM2-135M's 30 layers at batch 1: 20 vs 40 ms, `benchmarks/quant_kernels.py`); the quantized
matmuls need tinygemm on CUDA; the compiled decode step needs Dynamo's guard filter (~1 ms of guard
checks per step) and static graphs per batch size.

    inductor  decode_compile_kwargs (CPU streaming-reduction backend, CUDA graphs), rowwise
    dynamo    mark_dynamic, maybe_mark_dynamic, known_at_most, compile_counters, cache_counters, recompile_limit
    kernels   has_kernel, int8pack_mm, int4pack_convert/int4pack_mm, cpu_flash_attention
    compile   LoggedCompile: torch.compile that logs each compilation and its time, with a persistent store;
              compile_region: one traced/built graph for every call of a function (the decoder blocks)
    precompile  whole compiled steps saved and loaded without tracing (Dynamo's aot_compile), the warm start
"""

from fmstack.backends.compile import LoggedCompile, compile_region
from fmstack.backends.dynamo import (RECOMPILE_LIMIT, cache_counters, compile_counters, known_at_most, mark_dynamic,
                                     maybe_mark_dynamic, raise_recompile_limit, recompile_limit)
from fmstack.backends.gate import VERIFIED_TORCH, verified
from fmstack.backends.inductor import GEMV_MAX_ROWS, decode_compile_kwargs, gemv_as_reduction, rowwise
from fmstack.backends.kernels import cpu_flash_attention, has_kernel

__all__ = ["GEMV_MAX_ROWS", "RECOMPILE_LIMIT", "VERIFIED_TORCH", "LoggedCompile", "cache_counters", "compile_counters", "compile_region",
           "cpu_flash_attention", "decode_compile_kwargs", "gemv_as_reduction", "has_kernel", "known_at_most", "mark_dynamic",
           "maybe_mark_dynamic", "raise_recompile_limit", "recompile_limit", "rowwise", "verified"]
