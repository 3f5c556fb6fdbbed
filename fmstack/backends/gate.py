"""The version gate: which private torch symbols fmstack may use on this torch, looked up by name.

Every private symbol fmstack touches is listed in `SYMBOLS` with how to reach it. `symbol(name)`
returns it only on a torch release in `VERIFIED_TORCH` (the ones the CPU decode backend, the
quantized kernels and the CUDA tests ran on: 2.13 is the CPU build the suite runs, 2.11 the GPU
machines' image) and only where it exists; otherwise it returns None and the caller takes its
stock `torch.compile` / public-op path. Each such fallback is logged once per process as a warning
(an unverified torch: one warning for all symbols; a missing symbol: one per symbol), never raised.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

VERIFIED_TORCH = ("2.11", "2.13")  # major.minor releases the private uses below were verified on


def _module_attr(module: str, attr: str) -> Callable[[], Any]:
    return lambda: getattr(importlib.import_module(module), attr)


def _op(namespace: str, name: str) -> Callable[[], Any]:
    return lambda: getattr(getattr(torch.ops, namespace), name)


SYMBOLS: dict[str, Callable[[], Any]] = {
    "inductor.compile_fx": _module_attr("torch._inductor.compile_fx", "compile_fx"),
    "inductor.select_decomp_table": _module_attr("torch._inductor.decomposition", "select_decomp_table"),
    "inductor.CustomGraphPass": _module_attr("torch._inductor.custom_graph_pass", "CustomGraphPass"),
    "inductor.default_cache_dir": _module_attr("torch._inductor.runtime.cache_dir_utils", "default_cache_dir"),
    "prims.inductor_force_stride_order": _op("prims", "inductor_force_stride_order"),
    "dynamo.config": _module_attr("torch._dynamo", "config"),
    "dynamo.mark_dynamic": _module_attr("torch._dynamo", "mark_dynamic"),
    "dynamo.maybe_mark_dynamic": _module_attr("torch._dynamo", "maybe_mark_dynamic"),
    "dynamo.counters": _module_attr("torch._dynamo.utils", "counters"),
    "shapes.statically_known_true": _module_attr("torch.fx.experimental.symbolic_shapes", "statically_known_true"),
    "dynamo.unsupported_guard_types": lambda: importlib.import_module(
        "torch._dynamo.guards").CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES,
    "dynamo.restart_analysis": _module_attr("torch._dynamo.exc", "RestartAnalysis"),
    "dynamo.package": lambda: importlib.import_module("torch._dynamo.package"),
    "dynamo.aot_compiled_function": _module_attr("torch._dynamo.aot_compile", "AOTCompiledFunction"),
    "inductor.cpu_vec_isa": lambda: importlib.import_module("torch._inductor.cpu_vec_isa"),
    "inductor.config": lambda: importlib.import_module("torch._inductor.config"),
    "inductor.cpp_builder": lambda: importlib.import_module("torch._inductor.cpp_builder"),
    "inductor.async_compile": lambda: importlib.import_module("torch._inductor.async_compile"),
    "inductor.codecache": lambda: importlib.import_module("torch._inductor.codecache"),
    "C.dispatch_has_kernel": lambda: torch._C._dispatch_has_kernel_for_dispatch_key,
    "aten._weight_int8pack_mm": _op("aten", "_weight_int8pack_mm"),
    "aten._weight_int4pack_mm": _op("aten", "_weight_int4pack_mm"),
    "aten._convert_weight_to_int4pack": _op("aten", "_convert_weight_to_int4pack"),
    "aten._scaled_dot_product_flash_attention_for_cpu": _op("aten", "_scaled_dot_product_flash_attention_for_cpu"),
}

_resolved: dict[str, Any] = {}
_warned: set[str] = set()


def torch_version() -> str:
    return torch.__version__


def verified() -> bool:
    """Whether this torch's major.minor release is one the private uses were verified on."""
    return ".".join(torch_version().split("+")[0].split(".")[:2]) in VERIFIED_TORCH


def warn_once(key: str, message: str) -> None:
    """Log `message` as a warning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def symbol(name: str) -> Any | None:
    """The private torch object `name` (a key of `SYMBOLS`), or None after the one warning: on an
    unverified torch, or where this torch lacks it."""
    if name not in SYMBOLS:
        raise KeyError(f"{name!r} is not a gated private torch symbol; known: {', '.join(sorted(SYMBOLS))}")
    if not verified():
        warn_once("version", f"torch {torch_version()} is not one fmstack's private-torch uses were verified on "
                             f"({', '.join(v + '.x' for v in VERIFIED_TORCH)}): stock torch.compile and public "
                             "ops are used instead (slower CPU decode and quantized matmuls)")
        return None
    if name not in _resolved:
        try:
            _resolved[name] = SYMBOLS[name]()
        except (ImportError, AttributeError, RuntimeError):
            _resolved[name] = None
    if _resolved[name] is None:
        warn_once(name, f"torch {torch_version()} has no {name}: fmstack falls back to its stock/public path")
    return _resolved[name]


def available(name: str) -> bool:
    """Whether `symbol(name)` is usable (warns once like `symbol` when it is not)."""
    return symbol(name) is not None


def reset() -> None:
    """Forget resolved symbols and given warnings (tests that change the version or hide a symbol)."""
    _resolved.clear()
    _warned.clear()
