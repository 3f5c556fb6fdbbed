"""`torch.compile` with a log line per compilation: what is compiled (which step, batch size, token
count, greedy/sampled), that it happens once per process (a persistent store of compiled steps,
`store`, makes later processes fast), and how long it took. A compile is a minute or more for a real
model on a small CPU, and without these lines the first request looks hung."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor

from fmstack.backends.dynamo import compile_counters

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
    """Where compiled steps persist across processes (`fmstack.generation.compile_cache.CompileCache`)."""

    def load(self, what: str, label: tuple[str, ...]) -> bool: ...

    def save(self, what: str, label: tuple[str, ...]) -> Any: ...

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


class LoggedCompile:
    """`torch.compile(fn, **kwargs)` whose first call per key (`key(args)`, default `step_key`) logs
    (info) before and after, with the elapsed time and how many graphs Dynamo built in between. Other
    calls go straight through (the key and one set lookup of overhead). With a `store`, the first
    call per key first loads the step from it and, where it was not there, saves it afterwards."""

    def __init__(self, fn: Callable, what: str, static_tokens: bool = True,
                 key: Callable[[tuple], tuple[str, ...]] | None = None, store: CompileStore | None = None,
                 **kwargs: Any):
        self.what, self.store = what, store
        self.key = key or (lambda args: step_key(args, static_tokens))
        self.compiled = torch.compile(fn, **kwargs)
        self._seen: set[tuple[str, ...]] = set()

    def __call__(self, *args: Any) -> Any:
        key = self.key(args)
        if key in self._seen:
            return self.compiled(*args)
        self._seen.add(key)
        label = ", ".join(key) or "first call"
        t0 = time.perf_counter()
        stored = self.store is not None and self.store.load(self.what, key)
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
