"""The `torch.compile` settings that reach into Inductor and Dynamo: the CPU decode backend, the CUDA
decode options, and the guard filter.

On CPU, batch-1 decode is a chain of matrix-vector products and is bound by reading the weights
once per token. `torch.compile` by default sends every `x @ W.T` to the BLAS library (MKL's sgemv),
which on the AMD EPYC machines we measured streams weights at roughly a third of the memory
bandwidth (see `benchmarks/cpu_gemv_study.py`). The CPU decode backend instead has Inductor lower
every matmul with at most `gemv_max_rows` rows to one `(x[i, :, None] * W.T).sum(0)` per row `i`,
which it emits as one vectorized streaming pass over the weight rows with an accumulator per input
row, and runs the graph's wrapper in C++ (`cpp_wrapper`, no Python between the ~250 kernels of a
step). Results equal the BLAS ones up to float summation order.

On CUDA the decode step is one CUDA graph (`triton.cudagraphs`) with static shapes and
`coordinate_descent_tuning` (an M=1 matmul against a converted int8 weight becomes a fused
reduction). `torch.compile` rejects `mode` together with `options`, so these are spelled as options,
which also lets the guard filter in.

Behind the version gate (`fmstack.backends.gate`): where a private piece is unavailable, the decode
step gets stock `torch.compile(fullgraph=True, dynamic=False)` (CUDA: `mode="reduce-overhead"`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from fmstack.backends.gate import available, symbol

# Matmuls with up to this many rows become reductions: batch <= 8 decode, speculative verification.
# Measured on SmolLM2's projections (benchmarks/quant_kernels.py "fp32 reduction" vs "fp32 BLAS", ms
# per pass over 30 layers, 2 threads): 20 vs 40 for 1 row, 20 vs 69 for 2, 27 vs 54 for 4, 40 vs 61
# for 8, 64 vs 55 for 16.
GEMV_MAX_ROWS = 8
_CPU_BACKEND_SYMBOLS = ("inductor.compile_fx", "inductor.select_decomp_table", "inductor.CustomGraphPass")
_decomp_lock = threading.RLock()


CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def user_cache_dir() -> str | None:
    """Inductor's cache directory where the user chose one (`$TORCHINDUCTOR_CACHE_DIR`); None where it
    is unset or Inductor's own default, which Inductor writes into the environment itself on first
    use (importing torch._dynamo is enough), so the variable alone cannot tell."""
    value = os.environ.get(CACHE_DIR_ENV)
    default = symbol("inductor.default_cache_dir")
    if not value or (default is not None and os.path.abspath(value) == os.path.abspath(default())):
        return None
    return value


def set_cache_dir(path: str | os.PathLike) -> None:
    """Inductor's caches (FX graphs, AOTAutograd entries, built libraries) go to `path` from now on in
    this process and its compile workers (Inductor reads the variable at every cache access)."""
    os.environ[CACHE_DIR_ENV] = str(path)


def rowwise(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`fn(x)` for a reduction `fn` over the rows of x `[M, K]` against one weight, for Inductor (call it
    only while compiling). x is stored first: otherwise Inductor inlines x's producer (SwiGLU's silu,
    RMSNorm) into the reduction and recomputes it once per output column. A static M > 1 becomes one
    `fn` per row, concatenated: Inductor fuses those reductions into one pass over the weight with an
    accumulator per row, so the weight is read once for all rows (one `[M, N, K]` reduction reads it
    once per row)."""
    force_stride_order = symbol("prims.inductor_force_stride_order")
    if force_stride_order is not None:
        x = force_stride_order(x, x.stride())
    rows = x.shape[0]
    if isinstance(rows, int) and rows > 1:
        return torch.cat([fn(x[i:i + 1]) for i in range(rows)])
    return fn(x)


def gemv_as_reduction(a: Tensor, b: Tensor, max_rows: int = GEMV_MAX_ROWS) -> Tensor:
    """`a @ b` for `a [M, K]`, `b [K, N]` (typically `W.T`, a view of `W [N, K]`), written as a
    product and a sum over K, which Inductor lowers to a vectorized reduction (NotImplemented for
    M > max_rows, dtypes other than the float ones, or non-CPU tensors: the default lowering then
    applies). A bf16/fp16 `b` with an fp32 `a` is upconverted inside the reduction."""
    if (a.device.type != "cpu" or a.dim() != 2 or b.dim() != 2 or not a.dtype.is_floating_point
            or not b.dtype.is_floating_point):
        return NotImplemented
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if not statically_known_true(a.shape[0] <= max_rows):
        return NotImplemented
    acc = torch.promote_types(a.dtype, torch.float32)
    out = rowwise(lambda rows: (rows.to(acc).unsqueeze(2) * b.to(acc).unsqueeze(0)).sum(1), a)
    return out.to(torch.promote_types(a.dtype, b.dtype))


def has_compile_regions(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph calls a nested compile region (`invoke_subgraph`, `compile_region`)."""
    return any(node.op == "call_function" and "invoke_subgraph" in str(node.target) for node in gm.graph.nodes)


def has_collectives(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph calls torch.distributed's functional collectives (`_c10d_functional`)."""
    names = ("c10d_functional", "_functional_collectives")
    return any(node.op == "call_function" and any(n in str(node.target) for n in names)
               for node in gm.graph.nodes)


@contextlib.contextmanager
def mm_decomposition(mm: Callable) -> Iterator[None]:
    """Inductor's default decomposition table (the dict `select_decomp_table` hands out: torch 2.13
    caches it) with `mm` for `aten.mm` inside the block. Patched in place rather than handed to
    `compile_fx(decompositions=...)`: a table passed in is pickled into the FX graph cache key, and
    the default table's C++ entries cannot be, so every compile would bypass that cache.
    (Dynamo serializes compiles; the lock guards against other threads anyway.)"""
    table = symbol("inductor.select_decomp_table")()
    mm_op = torch.ops.aten.mm.default
    with _decomp_lock:
        saved = table.get(mm_op)
        table[mm_op] = mm
        try:
            yield
        finally:
            if saved is None:
                table.pop(mm_op, None)
            else:
                table[mm_op] = saved


def cpu_decode_backend(max_rows: int, options: dict[str, Any]) -> Callable:
    """Inductor with `gemv_as_reduction` as the mm decomposition and `options` as config patches
    (call only where `available` says the `_CPU_BACKEND_SYMBOLS` are there)."""
    compile_fx = symbol("inductor.compile_fx")
    select_decomp_table = symbol("inductor.select_decomp_table")
    aten = torch.ops.aten
    default_mm = select_decomp_table().get(aten.mm.default)

    def mm(a: Tensor, b: Tensor, *args: Any, **kwargs: Any):
        out = gemv_as_reduction(a, b, max_rows) if not args and not kwargs else NotImplemented
        if out is NotImplemented and default_mm is not None:
            return default_mm(a, b, *args, **kwargs)
        return out

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        patches = dict(options)
        if patches.get("cpp_wrapper") and has_collectives(gm):
            # torch 2.13's C++ wrapper cannot call the functional collectives (tensor parallel):
            # "arg type Any is not yet supported by custom_op_wrapper"
            patches["cpp_wrapper"] = False
        if patches.get("cpp_wrapper") and has_compile_regions(gm):
            # torch 2.13's C++ wrapper cannot call a compile region ("codegen invoke_subgraph is not
            # implemented for cpp wrapper"); the Python wrapper defines the region's code once and
            # calls it for every layer (docs/compile.md: what that costs per step)
            patches["cpp_wrapper"] = False
        if not patches.get("cpp_wrapper"):
            # the Python wrapper re-checks every input's and op output's size and stride with an
            # `assert_size_stride` call (~20 per decoder block in the decode step), all shapes Inductor
            # itself derived: pure per-step Python time at static shapes
            patches["size_asserts"] = False
        # A kernel with less than 4096 elements of work per thread runs on one thread (Inductor's
        # default threshold, 512, made the batch-1 SwiGLU product, 1536 elements, an OpenMP region of
        # its own in every layer: a fork/join per layer for ~1 us of work, and a stall whenever the
        # other core is busy). Batched steps and the argmax over the vocabulary stay parallel.
        patches.setdefault("cpp.min_chunk_size", 4096)
        # Both on-disk caches (AOTAutograd's, keyed on the graph before decomposition, and Inductor's
        # FX graph cache) key on Inductor's config: the key pass puts this backend's settings there,
        # so neither hands back the stock (BLAS) build of the same graph, nor that of another max_rows.
        patches["post_grad_custom_post_pass"] = decomposition_key_pass(max_rows)
        with mm_decomposition(mm):
            return compile_fx(gm, example_inputs, config_patches=patches)

    backend.__name__ = f"inductor_cpu_gemv{max_rows}"
    return backend


def decomposition_key(max_rows: int) -> str:
    """What identifies the CPU decode backend's build of a graph in the compile caches: the row limit
    and this module's source (a change to the lowering is a new key)."""
    source = Path(__file__).read_bytes()
    return f"fmstack-gemv-reduction:{max_rows}:{hashlib.sha256(source).hexdigest()[:16]}"


def decomposition_key_pass(max_rows: int) -> Any:
    """A no-op Inductor post-grad pass whose `uuid()` is `decomposition_key(max_rows)`: the way a
    custom pass enters Inductor's and AOTAutograd's cache keys (a pass without uuid turns caching off).
    The class is made once, on first use: its base is a gated private symbol."""
    global _KeyPass
    if _KeyPass is None:
        class _KeyPass(symbol("inductor.CustomGraphPass")):  # type: ignore[misc, no-redef]
            def __init__(self, rows: int):
                self.rows = rows

            def __call__(self, graph: torch.fx.Graph) -> None:
                return None

            def uuid(self) -> str:
                return decomposition_key(self.rows)

            def __reduce__(self) -> tuple:  # picklable though made inside a function
                return decomposition_key_pass, (self.rows,)

    return _KeyPass(max_rows)


_KeyPass: type | None = None


def frozen_attribute_guards(attribute: str) -> Callable[[list], list[bool]]:
    """A dynamo `guard_filter_fn` that drops the guards on `self.<attribute>` and everything reached
    through it (for a bound method whose `self.<attribute>` is a model that no longer changes: its
    ~5,000 guards cost SmolLM2's decode step ~1 ms, 8-10%, at every call). Guards on the arguments
    (tokens, cache, sampling tensors) and on global state stay. The guard names (`L['self'].x`) are
    Dynamo's own spelling, hence this lives here."""
    prefixes = (f"self.{attribute}", f"L['self'].{attribute}")

    def keep(entries: list) -> list[bool]:
        return [not e.name.startswith(prefixes) for e in entries]

    return keep


def decode_compile_kwargs(device: torch.device | str, gemv_max_rows: int = GEMV_MAX_ROWS,
                          frozen_attribute: str | None = None) -> dict[str, Any]:
    """`torch.compile` keyword arguments for a static-shape decode step on `device`: always
    `fullgraph=True, dynamic=False` (a second batch size gets its own static graph instead of turning
    decode dynamic). CPU: the streaming-reduction backend (`gemv_max_rows` > 0) or Inductor with the
    C++ wrapper; CUDA: CUDA graphs and coordinate-descent tuning as options. With `frozen_attribute`,
    no guards on `self.<frozen_attribute>` (see `frozen_attribute_guards`)."""
    device = torch.device(device)
    kw: dict[str, Any] = {"fullgraph": True, "dynamic": False}
    if device.type not in ("cpu", "cuda"):
        return kw
    if not available("inductor.compile_fx"):  # the stock path: public settings only
        if device.type == "cuda":
            kw["mode"] = "reduce-overhead"
        return kw
    if device.type == "cuda":
        kw["options"] = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    elif gemv_max_rows > 0 and all(available(s) for s in _CPU_BACKEND_SYMBOLS):
        # a custom backend takes no Inductor `options`: it passes them to compile_fx itself
        kw["backend"] = cpu_decode_backend(gemv_max_rows, {"cpp_wrapper": True})
        kw["options"] = {}
    else:
        kw["options"] = {"cpp_wrapper": True}
    if frozen_attribute is not None:
        kw["options"]["guard_filter_fn"] = frozen_attribute_guards(frozen_attribute)
    return kw
