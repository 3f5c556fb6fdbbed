"""Dynamo's private knobs fmstack uses: dynamic-dimension marks, the per-function recompile limit,
and the compile counters. Each degrades to a no-op (counters: zeros) behind the version gate."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from torch import Tensor

from fmstack.backends.gate import symbol

RECOMPILE_LIMIT = 64
_LIMIT_NAMES = ("recompile_limit", "cache_size_limit")  # the older name survives as an alias


def mark_dynamic(t: Tensor, dim: int) -> None:
    """Compile `t`'s dimension `dim` as symbolic (one graph for all its sizes); a no-op on the stock
    path, where Dynamo's automatic dynamic shapes recompile once instead."""
    fn = symbol("dynamo.mark_dynamic")
    if fn is not None:
        fn(t, dim)


# resolved at import: `symbol` imports lazily, which Dynamo refuses to trace inside a compiled step
_statically_known_true = symbol("shapes.statically_known_true")


def known_at_most(size: int, limit: int) -> bool:
    """Whether `size <= limit` is known without a guard: a static size (eager, or a static-shape
    graph) compares as usual; a size Dynamo traces as symbolic (a dynamic-length prefill) gives False
    unless its range proves it, instead of a guard that would compile a second graph past `limit`.
    Without the symbol (stock path): the plain comparison."""
    fn = _statically_known_true
    return bool(fn(size <= limit)) if fn is not None else size <= limit


def maybe_mark_dynamic(t: Tensor, dim: int) -> None:
    """Like `mark_dynamic`, but Dynamo may still specialize the dimension (no error if it does)."""
    fn = symbol("dynamo.maybe_mark_dynamic")
    if fn is not None:
        fn(t, dim)


def compile_counters() -> dict[str, int]:
    """What torch.compile has done so far in this process: graphs compiled (one per compile or
    recompile), frames compiled, graph breaks, Inductor's CUDA-graph skips. The difference of two
    readings counts a region; all zero without compilation (and on the stock path)."""
    counters = symbol("dynamo.counters")
    if counters is None:
        return {"graphs": 0, "frames": 0, "graph_breaks": 0, "cudagraph_skips": 0}
    return {"graphs": int(counters["stats"]["unique_graphs"]), "frames": int(counters["frames"]["ok"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def cache_counters() -> dict[str, int]:
    """Hits and misses so far in this process of Inductor's FX graph cache and AOTAutograd's cache
    (a hit: that graph was neither lowered nor built again); zeros on the stock path."""
    counters = symbol("dynamo.counters")
    names = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss")
    if counters is None:
        return dict.fromkeys(names, 0)
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {n: int((inductor if n.startswith("fx") else aot)[n]) for n in names}


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise Dynamo's per-function recompile limit (default 8) to at least `limit`, process-wide.
    Every `Generator` of a process compiles the same methods (one static graph per batch size, per
    few-token length, per greedy/sampled), and their graphs count against one limit per code object:
    three quantized copies of a model benchmarked at five batch sizes already need 15; past the
    limit a `fullgraph=True` compile fails."""
    cfg = symbol("dynamo.config")
    if cfg is None:
        return
    for name in _LIMIT_NAMES:
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


_scope_lock = threading.Lock()
_scope_depth = 0
_scope_saved: dict[str, int] = {}


@contextlib.contextmanager
def recompile_limit(limit: int = RECOMPILE_LIMIT) -> Iterator[None]:
    """Dynamo's recompile limit raised to at least `limit` inside the block, restored when the last
    of the (possibly nested or concurrent) blocks ends. ~80 us per entry: wrap whole requests, not
    single steps."""
    global _scope_depth
    cfg = symbol("dynamo.config")
    with _scope_lock:
        if _scope_depth == 0 and cfg is not None:
            _scope_saved.update({n: getattr(cfg, n) for n in _LIMIT_NAMES if hasattr(cfg, n)})
        _scope_depth += 1
        raise_recompile_limit(limit)
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                for name, value in _scope_saved.items():
                    setattr(cfg, name, value)
                _scope_saved.clear()
