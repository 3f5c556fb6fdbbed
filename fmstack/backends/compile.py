"""`torch.compile` with a log line per compilation: what is compiled (which step, batch size, token
count, greedy/sampled), that it happens once per process (a persistent store of compiled steps,
`store`, makes later processes fast), and how long it took. A compile is a minute or more for a real
model on a small CPU, and without these lines the first request looks hung."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor

from fmstack.backends import background, kernel_batch, vec_isa
from fmstack.backends.dynamo import compile_counters
from fmstack.backends.gate import warn_once
from fmstack.backends.precompile import (Precompiled, aot_compile, compile_settings, dynamic_dims, fits_this_cpu,
                                         global_state, load, module_digest, owner_state, precompile_available,
                                         serializable_guards, variant, vec_isa_probe)

log = logging.getLogger(__name__)


def compile_region(fn: Callable) -> Callable:
    """`fn` marked as a nested compile region (`torch.compiler.nested_compile_region`): inside a
    torch.compile, Dynamo traces it once and reuses that graph for every later call whose inputs
    have the same structure (tensors of the same shapes, modules of the same structure), and
    Inductor lowers and generates it once. Eager calls are plain calls. Without that API (older
    torch): `fn` itself, compiled inline as before."""
    mark = getattr(torch.compiler, "nested_compile_region", None)
    return fn if mark is None else mark(fn)


def step_key(args: tuple, static_tokens: bool = True) -> tuple[str, ...]:
    """What distinguishes one compiled graph of a model step from another, in words: the token batch's
    batch size and token count (the count left out with `static_tokens` False: it is symbolic) and,
    for the sampling steps (tokens, positions, cache, temperature, top_k, top_p, noise[, min_p, scale,
    add]), whether noise is None (the greedy graph) and which optional logit adjustments are passed
    (each None or not is a graph of its own)."""
    shape = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else ()
    words = [f"batch {shape[0]}"] if shape else []
    if static_tokens and len(shape) > 1 and shape[1] > 1:
        words.append(f"{shape[1]} tokens")
    if len(args) >= 7:
        words.append("greedy" if args[6] is None else "sampled")
        words += [name for name, a in zip(("min_p", "scale", "add"), args[7:10]) if a is not None]
    return tuple(words)


class CompileStore(Protocol):
    """Where compiled steps persist across processes (`fmstack.generation.compile_cache.CompileCache`):
    `load`/`save` the caches' artifacts of a step (the Dynamo path), `read`/`write` a whole saved step
    (`fmstack.backends.precompile`), `discard` an entry that could not be used (one warning)."""

    precompile: bool  # whether whole steps may be saved for this model (CPU)

    def load(self, what: str, label: tuple[str, ...]) -> bool: ...

    def save(self, what: str, label: tuple[str, ...]) -> Any: ...

    def read(self, what: str, label: tuple[str, ...]) -> tuple[bytes, dict] | None: ...

    def write(self, what: str, label: tuple[str, ...], data: bytes, meta: dict) -> Any: ...

    def discard(self, what: str, label: tuple[str, ...], problem: str) -> None: ...

    def where(self) -> str: ...


HEARTBEAT_S = 15.0  # a compile still running logs a line this often


@contextlib.contextmanager
def heartbeat(what: str, label: str, t0: float, every: float = HEARTBEAT_S) -> Iterator[None]:
    """Log "still compiling" every `every` seconds until the block ends (a cold compile on a small
    CPU is tens of seconds: the user sees that it is alive)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            log.info("still compiling %s (%s): %.0f s", what, label, time.perf_counter() - t0)

    thread = threading.Thread(target=beat, name="fmstack-compile-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def prepare_cpu_compile(args: tuple) -> None:
    """Before a step compiles on CPU: Inductor's vector-ISA verdict replayed from this machine's
    record, else probed in the background while Dynamo traces (`fmstack.backends.vec_isa`), and the
    graph's C++ kernels built as a few libraries (`fmstack.backends.kernel_batch`)."""
    if any(isinstance(a, Tensor) and a.device.type == "cpu" for a in args):
        kernel_batch.install()
        vec_isa.prefetch()


class LoggedCompile:
    """`torch.compile(fn, **kwargs)` whose first call per key (`key(args)`, default `step_key`) logs
    (info) before and after, with the elapsed time and how many graphs Dynamo built in between. Other
    calls go straight through (the key and one set lookup of overhead). With a `store`, the first
    call per key first loads the step from it and, where it was not there, saves it afterwards.

    With `precompile` (and a store whose `precompile` is set, on a torch that has it) each step is
    compiled ahead of time as a whole (`fmstack.backends.precompile`: Dynamo's trace, guards and
    Inductor's code) and saved, so a later process loads it without tracing; its guards (those on
    `self.<frozen_attribute>` dropped) pick the entry at every call. Where that fails, the step takes
    the path above, with one warning."""

    def __init__(self, fn: Callable, what: str, static_tokens: bool = True,
                 key: Callable[[tuple], tuple[str, ...]] | None = None, store: CompileStore | None = None,
                 precompile: bool = False, frozen_attribute: str | None = None, **kwargs: Any):
        self.fn, self.what, self.store, self.kwargs = fn, what, store, kwargs
        self.key = key or (lambda args: step_key(args, static_tokens))
        self.compiled = torch.compile(fn, **kwargs)
        self._seen: set[tuple[str, ...]] = set()
        self.frozen_attribute = frozen_attribute
        self.precompile = bool(precompile and store is not None and getattr(store, "precompile", False)
                               and precompile_available())
        self._entries: dict[tuple[str, ...], list[Precompiled]] = {}
        self.recipe: Callable[[], LoggedCompile] | None = None  # builds this in another process (`prebuild`)
        self._children: dict[tuple[str, ...], background.Child] = {}
        self.background_builds = 0  # steps this process loaded from a background compile (tests, logs)

    def prebuild(self, *args: Any) -> bool:
        """Start compiling this step for `args` in a child process that saves it whole to the store
        (`fmstack.backends.background`), so that this process can compile another step meanwhile; the
        first call with such arguments waits for the child and loads its entry. False (nothing
        started) where the step is not saved whole, is stored already or is being built."""
        if not self.precompile or self.recipe is None or self.ready(*args):
            return False
        key = self.key(args)
        label = self._label(key, args)
        if label in self._children or self.store.has(self.what, label):
            return False
        try:
            self._children[label] = background.Child(self.what, self.recipe, args)
        except Exception as e:  # noqa: BLE001 - e.g. an argument that cannot be described: compile it here
            log.info("%s (%s) cannot be compiled in the background (%s: %s)", self.what, ", ".join(key),
                     type(e).__name__, e)
            return False
        log.info("compiling %s (%s) in a background process meanwhile: saved whole in %s", self.what,
                 ", ".join(key), self.store.where())
        return True

    def __call__(self, *args: Any) -> Any:
        key = self.key(args)
        entries = self._entries.get(key)
        if entries:
            for entry in entries:
                if entry.accepts(args):
                    return entry(*args)
        elif key in self._seen:
            return self.compiled(*args)
        if self.precompile:
            entry = self._precompiled(key, args)
            if entry is not None:
                self._entries.setdefault(key, []).append(entry)
                return entry(*args)
        return self._compile(key, args)

    def ready(self, *args: Any) -> bool:
        """Whether this process has run this step for arguments with `args`' key already (loaded or
        compiled): a cheap check, no label digest and no file access."""
        key = self.key(args)
        return key in self._entries or key in self._seen

    def save_whole(self, *args: Any) -> bool:
        """Compile this step for `args` ahead of time and save it whole to the store (what a background
        compile's child process runs); False where it cannot be saved so."""
        return self._precompiled(self.key(args), args) is not None

    def stored(self, *args: Any) -> bool:
        """Whether the store holds this step for `args` (a call with them loads it instead of compiling)."""
        if self.store is None:
            return False
        key = self.key(args)
        return self.store.has(self.what, self._label(key, args) if self.precompile else key)

    def _label(self, key: tuple[str, ...], args: tuple) -> tuple[str, ...]:
        """The store's label of a whole saved step: its key and a digest of what its guards check."""
        state = repr((variant(args), compile_settings(self.kwargs), global_state(), owner_state(self.fn)))
        return ("precompiled", *key, "variant " + hashlib.sha256(state.encode()).hexdigest()[:12])

    def _compile(self, key: tuple[str, ...], args: tuple) -> Any:
        """The Dynamo path: log, load the caches' artifacts, compile, save them (first call per key)."""
        if key in self._seen:
            return self.compiled(*args)
        self._seen.add(key)
        label = ", ".join(key) or "first call"
        t0 = time.perf_counter()
        stored = self.store is not None and self.store.load(self.what, key)
        if not stored:
            prepare_cpu_compile(args)
        where = "" if self.store is None else self.store.where()
        log.info("compiling %s (%s): once per process%s", self.what, label,
                 f", from the compile cache {where}" if stored else
                 f"; cached in {where} for later processes" if self.store is not None else "")
        before = compile_counters()["graphs"]
        with heartbeat(self.what, label, t0):
            out = self.compiled(*args)
        if self.store is not None and not stored:
            self.store.save(self.what, key)
        log.info("compiled %s (%s) in %.1f s (%d graph(s) built)", self.what, label,
                 time.perf_counter() - t0, compile_counters()["graphs"] - before)
        return out

    def _precompiled(self, key: tuple[str, ...], args: tuple) -> Precompiled | None:
        """The saved step for these arguments, loaded, else compiled ahead of time and saved; None
        (precompile off from now on, one warning) where this step cannot be compiled so."""
        label = self._label(key, args)
        child = self._children.pop(label, None)
        if child is not None:
            t0 = time.perf_counter()
            with heartbeat(self.what, ", ".join(key) + ", in the background process", t0):
                child.wait()
            log.info("waited %.1f s for the background compile of %s (%s)", time.perf_counter() - t0, self.what,
                     ", ".join(key))
        entry = self._load_entry(key, label, args)
        if entry is not None:
            self.background_builds += child is not None
            return entry
        words = ", ".join(key) or "first call"
        log.info("compiling %s (%s): once per process; saved whole in %s for later processes", self.what, words,
                 self.store.where())
        t0, before = time.perf_counter(), compile_counters()["graphs"]
        prepare_cpu_compile(args)
        try:
            with heartbeat(self.what, words, t0):
                entry = aot_compile(self._aot_compiler(), self.fn, args)
            ok = entry.accepts(args)
        except Exception as e:  # noqa: BLE001 - Dynamo's precompile is experimental: any failure falls back
            entry, ok = None, f"{type(e).__name__}: {e}"
        if ok is not True:
            self.precompile = False
            why = ok or "its guards reject the arguments it was compiled for"
            warn_once(f"precompile {self.what}", f"{self.what} ({words}) cannot be saved whole ({why}): "
                      "compiling it with Dynamo (this process: each later one tries again)")
            return None
        self._write_entry(label, entry, args)
        log.info("compiled %s (%s) in %.1f s (%d graph(s) built)", self.what, words, time.perf_counter() - t0,
                 compile_counters()["graphs"] - before)
        return entry

    def _aot_compiler(self) -> Callable:
        """`torch.compile(fn, ...)` as in the constructor, with the guards an entry can carry."""
        options = {**self.kwargs.get("options", {}), "guard_filter_fn": serializable_guards(self.frozen_attribute)}
        return torch.compile(self.fn, **{**self.kwargs, "options": options})

    def _load_entry(self, key: tuple[str, ...], label: tuple[str, ...], args: tuple) -> Precompiled | None:
        """The stored entry under `label`, loaded, where it is there, current (the traced sources are
        unchanged) and accepts `args`; None otherwise (a broken entry is discarded, one warning)."""
        found = self.store.read(self.what, label)
        if found is None:
            return None
        data, meta = found
        sources = meta.get("sources") or {}
        if not sources or any(module_digest(name) != digest for name, digest in sources.items()):
            log.info("compile cache entry for %s (%s) is stale (its source changed): compiling again",
                     self.what, ", ".join(key))
            return None
        if not fits_this_cpu(meta.get("isa") or []):
            log.info("compile cache entry for %s (%s) was built for other vector ISAs (%s): compiling again",
                     self.what, ", ".join(key), ", ".join(meta.get("isa") or []))
            return None
        t0 = time.perf_counter()
        try:
            entry = load(data, self.fn, self.frozen_attribute, meta.get("dynamic") or {})
        except Exception as e:  # noqa: BLE001 - whatever an unreadable entry raises, it is rebuilt
            self.store.discard(self.what, label, f"{type(e).__name__}: {e}")
            return None
        if not entry.accepts(args):
            log.info("compile cache entry for %s (%s) does not fit these arguments (%s): compiling again",
                     self.what, ", ".join(key), entry.rejection(args))
            return None
        log.info("loaded compiled %s (%s) from the compile cache %s in %.1f s (nothing traced)", self.what,
                 ", ".join(key), self.store.where(), time.perf_counter() - t0)
        return entry

    def _write_entry(self, label: tuple[str, ...], entry: Precompiled, args: tuple) -> None:
        try:
            data = entry.to_bytes()
        except Exception as e:  # noqa: BLE001 - the step still runs in this process
            warn_once(f"precompile save {self.what}", f"{self.what} compiled but could not be saved "
                      f"({type(e).__name__}: {e}): later processes compile it again")
            return
        self.store.write(self.what, label, data, {"sources": entry.sources(), "isa": vec_isa_probe(),
                                                   "args": list(variant(args)), "state": global_state(),
                                                   "settings": compile_settings(self.kwargs),
                                                   "dynamic": dynamic_dims(self.fn, args)})
