"""fmstack's native CPU kernels, built from `kernels.cpp` on first use with the C++ compiler
torch.compile already needs, and cached across processes:

  torch.ops.fmstack.block_linear      matmul with block-quantized weights (`fmstack.quant.blocks`)
  torch.ops.fmstack.decode_attention  a few query tokens over a masked KV cache (the static cache's
                                      decode step, `fmstack.generation.kv_cache`): the visible keys only
  torch.ops.fmstack.block_rows        rows of a block-quantized weight in float32 (a quantized
                                      embedding's lookup)

Why our own op: no library kernel takes ggml's block layout as it is. torchao 0.18 (the PyPI wheel
for this torch) ships only CUDA libraries, which do not load on a CPU machine, and its x86
int8-activation/int4-weight linear wants its own packed layout and per-group zero points;
PyTorch's tinygemm-layout int4 CPU matmul runs 98 ms a pass on SmolLM2-135M's projections against
15 ms for fmstack's own int4 reduction (benchmarks/results/quant_kernels_cpu.json), its int8 pack matmul
has per-channel scales only and float activations. docs/quant-kernels.md has the design and figures.

Build cache: `<fmstack cache dir>/kernels/<key>/` ($FMSTACK_CACHE_DIR, the directory
`fmstack.paths.cache_dir`, the one the compile cache uses), keyed by the sources' hash, the torch
version and the compiler's version, so a changed source, torch or compiler builds afresh. A process
that finds the library built loads it directly (a few ms); concurrent first builds serialize on
torch.utils.cpp_extension's lock file in that directory (one builds, the others wait and load).

`FMSTACK_NATIVE_KERNELS=0` disables the op (everything runs the pure-PyTorch reference); so does a
failed build (no compiler, no ninja), with one warning per process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from fmstack.paths import cache_dir

log = logging.getLogger(__name__)

ENV_SWITCH = "FMSTACK_NATIVE_KERNELS"
SOURCES = ("kernels.cpp", "block_kernels.h", "attention_kernels.h")
# -fopenmp: at::parallel_for is a header template over `#pragma omp parallel`; built without it the op
# ran on one thread whatever torch.set_num_threads said (2 threads took the time of 1). The library
# then needs libgomp.so.1, the soname of the copy torch itself loads, so both share one thread pool.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
STALE_LOCK_S = 600.0  # a lock file older than this was left by a killed build

_here = Path(__file__).resolve().parent
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried; "error": str


def enabled() -> bool:
    """False where $FMSTACK_NATIVE_KERNELS is 0/false/no/off (read on every call: tests flip it)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        res = subprocess.run([cxx, "--version"], check=False, capture_output=True, text=True, timeout=30)
        return f"{cxx} {res.stdout.splitlines()[0] if res.stdout else ''}"
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C++ compiler ({cxx}: {e})") from e


def build_key() -> str:
    """Hash of the sources, the torch version and the compiler: the build directory's name."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((_here / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update(_compiler_id().encode())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """`<fmstack cache dir>/kernels/<build_key()>`."""
    return cache_dir() / "kernels" / build_key()


def _library_name(key: str) -> str:
    return f"fmstack_kernels_{key}"


def _build(directory: Path, name: str) -> None:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # else cpp_extension's baton waits forever
    t0 = time.perf_counter()
    cpp_extension.load(name=name, sources=[str(_here / "kernels.cpp")], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                       extra_include_paths=[str(_here)], build_directory=str(directory),
                       is_python_module=False, verbose=False)
    log.info("built the native block kernels in %.1f s (%s)", time.perf_counter() - t0, directory)


def _load() -> None:
    directory = build_dir()
    key = directory.name
    name = _library_name(key)
    lib = directory / f"{name}.so"
    if lib.exists() and not (directory / "lock").exists():
        torch.ops.load_library(str(lib))
    else:
        _build(directory, name)
    _register_fake()
    torch.ops.fmstack.block_linear_isa(torch.backends.cpu.get_cpu_capability())  # honour ATEN_CPU_CAPABILITY


@torch.compiler.assume_constant_result  # traced as a constant: no graph break in compiled callers
def available() -> bool:
    """Whether `torch.ops.fmstack.block_linear` is usable: enabled, and built and loaded (once per
    process; a failure logs one warning and stays False)."""
    if not enabled():
        return False
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                try:
                    if shutil.which(os.environ.get("CXX", "c++")) is None:
                        raise RuntimeError(f"no C++ compiler on PATH ({os.environ.get('CXX', 'c++')})")
                    _load()
                    _state["ok"] = True
                except Exception as e:  # noqa: BLE001 - any build/load failure means: use the reference
                    _state["ok"], _state["error"] = False, f"{type(e).__name__}: {e}"
                    log.warning("native block kernels unavailable, using the PyTorch reference: %s", _state["error"])
    return bool(_state["ok"])


def isa(request: str = "") -> str:
    """The code path the op runs ("avx512vnni", "avxvnni", "avx2", "scalar"); with `request` (an ATen
    capability DEFAULT/AVX2/AVX512 or one of those names) first switch to the best path it allows."""
    if not available():
        raise RuntimeError(f"native block kernels unavailable: {_state.get('error', f'{ENV_SWITCH}=0')}")
    return torch.ops.fmstack.block_linear_isa(request)


def block_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor | None, bits: int, block: int, n: int,
                 int8_act: bool) -> Tensor:
    """`torch.ops.fmstack.block_linear` on float32 contiguous x `[M, K]` and a weight interleaved by 16
    rows (`fmstack.quant.blocks.pack_rows`, n output rows) -> float32 `[M, n]`; only after `available()`.
    The weight tensors are made contiguous (free where they are)."""
    mins = None if mins is None else mins.contiguous()
    return torch.ops.fmstack.block_linear(x, qweight.contiguous(), scales.contiguous(), mins, bits, block, n, int8_act)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tensor:
    """`torch.ops.fmstack.decode_attention`: q `[B, H, T, D]` over one layer's cache k, v `[B, Hkv, S, D]`
    (float32; query head h reads kv head h // (H / Hkv)), `visible` bool `[B, 1, T, S]` -> `[B, H, T, D]`,
    softmax over the visible keys only; only after `available()`."""
    return torch.ops.fmstack.decode_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                              visible.expand(q.shape[0], 1, q.shape[2], k.shape[2]).contiguous(), scale)


def block_rows(qweight: Tensor, scales: Tensor, mins: Tensor | None, bits: int, block: int, n: int,
               ids: Tensor) -> Tensor:
    """`torch.ops.fmstack.block_rows`: rows `ids` (int64, any shape, flattened) of an interleaved block
    weight (`fmstack.quant.blocks.pack_rows`, n rows) as float32 `[len(ids), K]`; only after `available()`."""
    return torch.ops.fmstack.block_rows(qweight.contiguous(), scales.contiguous(),
                                        None if mins is None else mins.contiguous(), bits, block, n, ids.reshape(-1))


def _register_fake() -> None:
    """Shape rules for torch.compile (FakeTensor tracing: no graph break), once the ops exist."""
    @torch.library.register_fake("fmstack::block_linear")
    def _(x, qweight, scales, mins, bits, block, n, int8_act):
        return x.new_empty((x.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("fmstack::decode_attention")
    def _(q, k, v, visible, scale):
        return torch.empty_like(q)

    @torch.library.register_fake("fmstack::block_rows")
    def _(qweight, scales, mins, bits, block, n, ids):
        return scales.new_empty((ids.shape[0], scales.shape[1] * block), dtype=torch.float32)
