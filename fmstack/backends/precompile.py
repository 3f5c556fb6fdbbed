"""Whole compiled steps saved to disk and loaded without Dynamo: torch 2.13's ahead-of-time compile
(`torch.compile(fn, ...).aot_compile((args, kwargs))`, `save_compiled_function`,
`torch.compiler.load_compiled_function`, all experimental in 2.13). An entry holds Dynamo's traced
bytecode, its guards and the Inductor output (the wrapper code; the built kernels stay in Inductor's
cache directory, found by their source hash, rebuilt where missing), so a later process neither traces
nor lowers: it unpickles, imports the wrapper module and rebuilds the guards.

Why: with AOTAutograd's and Inductor's caches alone, a warm process still re-ran Dynamo on every step
(bytecode tracing 3.3-3.4 s, the compile region's reuse checks included, guard building 0.4 s) and
Inductor's CPU probe (below): 7.1-7.3 s from loaded weights to the first tokens of SmolLM2-135M fp32
batch 1; with the steps loaded from here 1.4-1.5 s (1 thread, same machine and load; docs/compile.md,
"Warm start").

Four things make fmstack's steps loadable and fast to load, each handled here:
  guards: Dynamo cannot serialize guards on object identity (module, function, id matches) or on
    globals; `serializable_guards` drops those together with the guards on the frozen model (as
    `frozen_attribute_guards` does for the in-process compile). What stays guards the arguments:
    tensor dtypes, shapes and strides, the cache module's buffers, the generator's settings.
  key order: iterating the model's ModuleList records a key-order guard on `self.model...._modules`,
    which the loader cannot evaluate once the model's guards were dropped (the model is not pickled);
    `load` leaves those out, like every other guard on the frozen model.
  dynamic marks: torch 2.13 saves a tensor argument as a meta tensor without its `mark_dynamic`
    marks, and the rebuilt guard then rejects the marked prompt of every later call; the entry records
    the marks (`dynamic_dims`) and `load` puts them back.
  the CPU probe: Inductor checks each vector ISA the CPU reports by building and dlopen-ing a test
    library in a child Python (~2.7 s for the 4 ISAs of an AVX-512 Xeon) the first time a process loads
    a kernel; `load` skips it where the saving process found the same ISAs valid
    (`vec_isa_probe`, recorded in the entry).

Weights are inputs of the saved graph (Dynamo lifts parameters and buffers, read from `self.model` at
every call), not constants: an entry serves any model with the same key (config, dtypes,
quantization, layouts), whatever its weights (tests/generation/test_compile_precompile.py checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fmstack.backends import kernel_batch, vec_isa
from fmstack.backends.gate import available, symbol

log = logging.getLogger(__name__)

# what shapes a saved step besides the traced code: the decode backend's lowering, this loader
BACKEND_MODULES = ("fmstack.backends.inductor", "fmstack.backends.precompile")
_SYMBOLS = ("dynamo.counters", "dynamo.restart_analysis", "dynamo.unsupported_guard_types", "dynamo.package", "dynamo.aot_compiled_function",
            "inductor.cpu_vec_isa", "inductor.config")


def precompile_available() -> bool:
    """Whether this torch can save and load whole compiled steps (after the gate's one warning if not)."""
    return (hasattr(torch.compiler, "load_compiled_function") and all(available(s) for s in _SYMBOLS))


def serializable_guards(frozen_attribute: str | None) -> Callable[[Sequence[Any]], list[bool]]:
    """A `guard_filter_fn` keeping the guards an entry can carry: none on `self.<frozen_attribute>`,
    none on globals, none of the types Dynamo cannot serialize (identity matches)."""
    unsupported = set(symbol("dynamo.unsupported_guard_types"))
    prefixes = _frozen_prefixes(frozen_attribute)

    def keep(entries: Sequence[Any]) -> list[bool]:
        return [not (e.is_global or e.guard_type in unsupported or (prefixes and e.name.startswith(prefixes)))
                for e in entries]

    return keep


def _frozen_prefixes(frozen_attribute: str | None) -> tuple[str, ...]:
    return () if frozen_attribute is None else (f"self.{frozen_attribute}", f"L['self'].{frozen_attribute}")


def variant(args: Sequence[Any]) -> tuple[str, ...]:
    """What a compiled step's guards check about its arguments, in words, for the entry's key: each
    tensor's dtype and shape (a dimension marked dynamic as "s") and whether it is an inference tensor,
    a module's buffers (the KV cache: its length), other values by repr. Two calls with the same words run the same graph."""
    def word(a: Any) -> str:
        if isinstance(a, Tensor):
            dynamic = getattr(a, "_dynamo_dynamic_indices", set())
            dims = ",".join("s" if i in dynamic else str(n) for i, n in enumerate(a.shape))
            mode = "" if a.is_inference() else "+autograd"  # Dynamo guards on the dispatch keys
            return f"{str(a.dtype).removeprefix('torch.')}[{dims}]{mode}"
        if isinstance(a, nn.Module):
            buffers = sorted((n, str(b.dtype), tuple(b.shape)) for n, b in a.named_buffers())
            digest = hashlib.sha256(repr((type(a).__qualname__, buffers)).encode()).hexdigest()[:12]
            return f"{type(a).__name__}:{digest}"
        return repr(a) if a is None or isinstance(a, (bool, int, float, str)) else type(a).__name__
    return tuple(word(a) for a in args)


def compile_settings(kwargs: dict[str, Any]) -> str:
    """`torch.compile`'s keyword arguments in words, for the entry's key (the backend by name: the CPU
    decode backend's name carries its row limit); the guard filter is left out (entries use their own)."""
    def word(value: Any) -> str:
        return getattr(value, "__name__", type(value).__name__) if callable(value) else repr(value)

    options = {k: v for k, v in (kwargs.get("options") or {}).items() if k != "guard_filter_fn"}
    return repr(sorted([(k, word(v)) for k, v in kwargs.items() if k != "options"] +
                       [(f"options.{k}", word(v)) for k, v in options.items()]))


def global_state() -> str:
    """The process state Dynamo's saved guards check besides the arguments (its global-state guard:
    thread count, grad and inference mode, default dtype), for the entry's key: a step saved by a
    2-thread process is another entry than a 1-thread one's (both kept, neither overwrites the other)."""
    return (f"threads {torch.get_num_threads()}, grad {torch.is_grad_enabled()}, "
            f"inference {torch.is_inference_mode_enabled()}, {torch.get_default_dtype()}")


def owner_state(fn: Callable) -> str:
    """For a bound method, its instance's plain settings (not its modules or tensors: those are
    arguments of the graph) in words, for the entry's key: the saved guards check them (the generator
    steps' SDPA choice), so steps of differently set instances are different entries."""
    owner = owner_of(fn)
    if owner is None:
        return ""
    return repr(sorted((k, repr(v)) for k, v in vars(owner).items() if not isinstance(v, (nn.Module, Tensor))))


def vec_isa_probe() -> list[str]:
    """The vector ISAs Inductor found usable in this process (probing them if not done yet)."""
    return [str(isa) for isa in symbol("inductor.cpu_vec_isa").valid_vec_isa_list()]


def cpu_vec_isas() -> list[str]:
    """The vector ISAs this CPU reports that Inductor knows (its candidates, before any test build)."""
    isa = symbol("inductor.cpu_vec_isa")
    flags = set(isa.x86_isa_checker()) if hasattr(isa, "x86_isa_checker") else set()
    return [str(i) for i in isa.supported_vec_isa_list if all(f in flags for f in str(i).split())]


def fits_this_cpu(recorded: Sequence[str]) -> bool:
    """Whether an entry whose saving process found `recorded` valid (`vec_isa_probe`) was built for
    the vector ISAs of this CPU: its kernels use the best of them, which this CPU must have too."""
    return list(recorded) == cpu_vec_isas()


# the dimension marks Dynamo guards on (`mark_dynamic`, `maybe_mark_dynamic`, ...), as tensor attributes
DIM_MARKS = ("_dynamo_dynamic_indices", "_dynamo_weak_dynamic_indices", "_dynamo_unbacked_indices",
             "_dynamo_strict_unbacked_indices", "_dynamo_static_indices")


def dynamic_dims(fn: Callable, args: Sequence[Any]) -> dict[str, dict[str, list[int]]]:
    """The dimension marks (`DIM_MARKS`: `mark_dynamic`, `maybe_mark_dynamic`, ...) on `fn`'s tensor
    arguments and on the tensors they hold (a module's plain tensor attributes and submodules,
    dataclass fields, tuples), by path ("tokens", "cache.slots.kv_slots",
    "cache.slots.meta.groups.0.q_index"): recorded with an entry, because Dynamo's saved guards lose
    them (see `load`)."""
    found: dict[str, dict[str, list[int]]] = {}
    seen: set[int] = set()
    for name, a in zip(inspect.signature(fn).parameters, args):
        _find_marks(a, name, found, seen)
    return found


def _find_marks(value: Any, path: str, found: dict, seen: set[int], depth: int = 0) -> None:
    if id(value) in seen or depth > 8:
        return
    seen.add(id(value))
    if isinstance(value, Tensor):
        marks = {attr: sorted(getattr(value, attr)) for attr in DIM_MARKS if hasattr(value, attr)}
        if marks:
            found[path] = marks
        return
    if isinstance(value, nn.Module):  # buffers and parameters are left out: Dynamo keeps their shapes static
        children = [*value._modules.items(), *((k, v) for k, v in vars(value).items() if not k.startswith("_"))]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, (tuple, list)):
        children = [(str(i), v) for i, v in enumerate(value)]
    else:
        return
    for key, child in children:
        _find_marks(child, f"{path}.{key}", found, seen, depth + 1)


def _resolve(scope: dict[str, Any], path: str) -> Any:
    """The value at `path` (a `dynamic_dims` path) in a saved entry's local scope; None where absent."""
    name, *rest = path.split(".")
    value = scope.get(name)
    for key in rest:
        value = value[int(key)] if isinstance(value, (tuple, list)) else getattr(value, key, None)
        if value is None:
            return None
    return value


@contextlib.contextmanager
def _loadable_guards(prefixes: tuple[str, ...], dynamic: dict[str, dict[str, list[int]]]) -> Iterator[None]:
    """While loading, the saved guards as Dynamo's loader reads them (`package.load_guards_state`)
    with two repairs: no key-order guards on the frozen model (see the module docstring), and the
    dynamic-dimension marks back on the saved arguments (torch 2.13 saves a tensor argument as a meta
    tensor without them, and the rebuilt guard then demands that a marked argument is unmarked)."""
    package = symbol("dynamo.package")
    original = package.load_guards_state

    def load_guards_state(data: bytes) -> Any:
        state = original(data)
        graph = state.output_graph
        kept = type(graph.guard_on_key_order)(s for s in graph.guard_on_key_order if not s.name.startswith(prefixes))
        for path, marks in dynamic.items():
            value = _resolve(graph.local_scope, path)
            if isinstance(value, Tensor):
                for attr, dims in marks.items():
                    setattr(value, attr, set(dims))
        state.output_graph = dataclasses.replace(graph, guard_on_key_order=kept)
        return state

    package.load_guards_state = load_guards_state
    try:
        yield
    finally:
        package.load_guards_state = original


class Precompiled:
    """One saved-or-loaded compiled step. `accepts(args)` checks its guards; `__call__` runs it
    (call `accepts` first: a graph run on arguments its guards reject is wrong). For a bound method the
    instance is passed first, as Dynamo saved the plain function."""

    def __init__(self, fn: Any, owner: object | None):
        self.fn, self.owner = fn, owner
        self.prefix = () if owner is None else (owner,)
        self._check = fn._artifacts.guard_manager.check
        self._bind = fn.prepare_f_locals
        self._run = fn.fn

    def accepts(self, args: tuple) -> bool:
        return bool(self._check(self._bind(*self.prefix, *args)))

    def __call__(self, *args: Any) -> Any:
        return self._run(*self.prefix, *args)

    def rejection(self, args: tuple) -> str:
        """Which guard rejects `args`, in Dynamo's words (for the log)."""
        info = self.fn._artifacts.guard_manager.check_verbose(self._bind(*self.prefix, *args))
        return "; ".join(info.verbose_code_parts)[:300]

    def to_bytes(self) -> bytes:
        return symbol("dynamo.aot_compiled_function").serialize(self.fn).serialized_data

    def sources(self) -> dict[str, str]:
        """The modules Dynamo traced through, and fmstack's compile backends, with the sha256 of each
        one's file now: an entry is valid only while they are unchanged (a changed `models/llama.py`
        must trace again, a changed lowering must build again)."""
        names = sorted({s.module for s in self.fn.source_info().inlined_sources} | set(BACKEND_MODULES))
        return {name: module_digest(name) for name in names}


def module_digest(name: str) -> str:
    """sha256 of module `name`'s source file ("" where it has none)."""
    spec = importlib.util.find_spec(name)
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return ""
    with open(origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def owner_of(fn: Callable) -> object | None:
    return fn.__self__ if inspect.ismethod(fn) else None


def aot_compile(compiled: Callable, fn: Callable, args: tuple, attempts: int = 3) -> Precompiled:
    """Trace and compile `compiled` (what `torch.compile(fn, ...)` returned) for `args` as a saveable
    entry (a bound method's instance is not among `args`). Raises whatever Dynamo raises where the
    step cannot be saved. Dynamo's in-process compile restarts a trace that asks for it (e.g. a float
    it turns into a tensor once an earlier compile of the same code saw another value: a second
    model in the process); `aot_compile` raises that instead, so it is retried (the restart's
    decision is recorded, the next trace takes it)."""
    restart, stats = symbol("dynamo.restart_analysis"), symbol("dynamo.counters")["stats"]
    for attempt in range(attempts):
        graphs = stats["unique_graphs"]
        try:
            return Precompiled(compiled.aot_compile((args, {})), owner_of(fn))
        except restart:
            stats["unique_graphs"] = graphs  # the abandoned trace built no graph (the counters say so)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def load(data: bytes, fn: Callable, frozen_attribute: str | None, dynamic: dict[str, dict[str, list[int]]]) -> Precompiled:
    """The entry saved as `data` for `fn` (raises on any unreadable entry); `dynamic` as recorded when
    it was saved (`dynamic_dims`). The caller checked the entry's ISAs first (`fits_this_cpu`)."""
    vec_isa.settle()  # Inductor's verdict replayed from this machine's record (the saving process wrote it)
    kernel_batch.install()  # the saving process built the kernels together: the same libraries are found
    with _loadable_guards(_frozen_prefixes(frozen_attribute), dynamic):
        loaded = torch.compiler.load_compiled_function(io.BytesIO(data))
    return Precompiled(loaded, owner_of(fn))
