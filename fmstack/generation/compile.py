"""How the generation model calls are compiled (the policy; the private-torch settings behind it are
in `fmstack.backends`).

  decode-like steps (a few tokens per row: decode, a one-token prefill, speculative draft and
  verification up to GEMV_MAX_ROWS tokens): static shapes, one graph per batch size and token count,
  no guards on the model (`frozen_attribute`); on CPU matmuls of <= GEMV_MAX_ROWS rows stream the
  weights as Inductor reductions (SmolLM2-135M's 30 layers at batch 1: 20 vs 40 ms per pass,
  `benchmarks/quant_kernels.py`), on CUDA the step is one CUDA graph.
  prefill-like steps (longer prompts): one graph for every length (the caller marks the sequence
  dimension dynamic).

Every compile logs what it compiles and how long it took (`fmstack.backends.LoggedCompile`); with a
`store` (`fmstack.generation.compile_cache.CompileCache`, what Generator passes) each compiled step
persists across processes: the next process loads it instead of lowering and building it again.

    step = compile_decode(decode_fn, device, what="decode step", store=cache)    # what Generator uses
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from fmstack.backends import GEMV_MAX_ROWS, LoggedCompile, decode_compile_kwargs, recompile_limit
from fmstack.backends.compile import CompileStore

__all__ = ["COMPILE_ENV", "GEMV_MAX_ROWS", "compile_by_default", "compile_decode", "compile_prefill",
           "with_recompile_limit"]

COMPILE_ENV = "FMSTACK_COMPILE"


def compile_by_default() -> bool:
    """Whether what compiles by default (the generate/eval/bench commands, the lm-eval model) does:
    yes unless `$FMSTACK_COMPILE` is "0" (a test suite or script of many one-off runs turns it off
    once, instead of passing --no-compile everywhere)."""
    return os.environ.get(COMPILE_ENV, "1") != "0"


def compile_decode(fn: Callable, device: torch.device | str, gemv_max_rows: int = GEMV_MAX_ROWS,
                   frozen_attribute: str | None = None, what: str = "decode step",
                   store: CompileStore | None = None, precompile: bool = False) -> LoggedCompile:
    """`fn` compiled as a static-shape decode step on `device` (see the module docstring); with
    `precompile` (and `store`) saved whole for later processes (`LoggedCompile`)."""
    step = LoggedCompile(fn, what, store=store, precompile=precompile, frozen_attribute=frozen_attribute,
                         **decode_compile_kwargs(device, gemv_max_rows, frozen_attribute))
    step.recipe = functools.partial(compile_decode, fn, device, gemv_max_rows, frozen_attribute, what, store, precompile)
    return step


def compile_prefill(fn: Callable, what: str = "prefill", store: CompileStore | None = None,
                    precompile: bool = False, frozen_attribute: str | None = None) -> LoggedCompile:
    """`fn` compiled with a sequence length the caller marks dynamic (one graph for all lengths); with
    `precompile` (and `store`) saved whole, without guards on `self.<frozen_attribute>`. Everything
    else is static (`dynamic=False`): a second batch size is a graph of its own, where Dynamo's
    automatic dynamic shapes would re-trace with a symbolic batch, which torch 2.13 fails on inside
    the compile region (InternalTorchDynamoError KeyError in `stamp_out_subgraph`)."""
    step = LoggedCompile(fn, what, static_tokens=False, store=store, precompile=precompile,
                         frozen_attribute=frozen_attribute, fullgraph=True, dynamic=False)
    step.recipe = functools.partial(compile_prefill, fn, what, store, precompile, frozen_attribute)
    return step


def with_recompile_limit(method: Callable) -> Callable:
    """Decorator for a generator's entry point: while it runs on a compiled generator (`self.compiled`),
    Dynamo's process-wide per-function recompile limit is raised (`fmstack.backends.recompile_limit`),
    and restored afterwards. Every generator of a process compiles the same methods (one static graph
    per batch size, per few-token length, per greedy/sampled) and their graphs share one limit (8 by
    default) per code object; past it a `fullgraph=True` compile fails."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if not self.compiled:
            return method(self, *args, **kwargs)
        with recompile_limit():
            return method(self, *args, **kwargs)

    return run
