"""Batched generation over a static KV cache: left-padded prompts, per-row sampling parameters,
per-row stops (EOS, stop strings, max tokens: `generation.stopping`), streaming text with incremental
detokenization."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmstack.backends import LoggedCompile, mark_dynamic
from fmstack.errors import ParameterError
from fmstack.generation.compile import GEMV_MAX_ROWS, compile_decode, compile_prefill, with_recompile_limit
from fmstack.generation.compile_cache import CompileCache
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.generation.sampling import (SamplingParams, adjust_logits, exponential_noise, logit_adjustments,
                                        min_p_tensor, sample, sampling_tensors)
from fmstack.generation.stopping import StopChecker
from fmstack.models.llama import sdpa_backend_name
from fmstack.generation.structured import Constraint, apply_masks

SDPA_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
CPU_SDPA_BACKENDS = ("math", "flash")


def sdpa_backends(name: str, device: torch.device, masked: bool = False) -> list[SDPBackend]:
    """`--sdpa-backend` -> the backends `sdpa_kernel` may pick from ('auto': all of them). `masked`:
    the attention passes a mask (every KV cache does), which CUDA's flash kernel cannot take."""
    if name == "auto":
        return list(SDPA_BACKENDS.values())
    if name not in SDPA_BACKENDS:
        raise ParameterError(f"sdpa backend {name!r} is unknown; choose auto, {', '.join(SDPA_BACKENDS)}")
    if device.type == "cpu" and name not in CPU_SDPA_BACKENDS:
        raise ParameterError(f"sdpa backend {name!r} needs CUDA; on CPU choose auto, math or flash")
    if masked and name == "flash" and device.type == "cuda":
        raise ParameterError("--sdpa-backend flash cannot attend through the KV cache on CUDA: the cache masks "
                             "padding and unwritten slots and CUDA's flash kernel takes no mask; choose auto, "
                             "efficient, cudnn or math")
    return [SDPA_BACKENDS[name]]


log = logging.getLogger(__name__)

CACHE_LEN_MULTIPLE = 256  # cache lengths are rounded up to this, so nearby requests reuse one cache


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str = ""
    finish_reason: str = "length"  # "length" | "stop" (see fmstack.generation.stopping)
    stop_reason: int | str | None = None  # with "stop": the EOS id or the stop string that ended it
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)  # the first token comes out of the prefill
        return n / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class _Row:
    params: SamplingParams
    stops: StopChecker
    result: GenerationResult = field(default_factory=lambda: GenerationResult([]))
    done: bool = False
    matcher: object | None = None  # grammar state of a constrained row (structured.Matcher)


class ModelSteps:
    """The model calls of a `Generator` (one forward + sampling each): what torch.compile wraps. A class
    of their own that holds only what they read (the model and the `--sdpa-backend` choice): a step
    saved whole for later processes (`fmstack.backends.precompile`) carries its `self` in its guards'
    state, which must not drag the generator's tokenizer or its compiled steps along."""

    def __init__(self, model: nn.Module, backends: list[SDPBackend], auto: bool):
        self.model, self.sdpa_backends, self.auto_sdpa = model, backends, auto

    def _sdpa_choice(self) -> contextlib.AbstractContextManager:
        """`--sdpa-backend` around a model call: 'auto' leaves torch's choice alone (no context: in a
        compiled step `sdpa_kernel` is a call into torch.nn.attention, which keeps AOTAutograd's cache
        from storing the graph), a named backend restricts SDPA to it."""
        return contextlib.nullcontext() if self.auto_sdpa else sdpa_kernel(self.sdpa_backends)

    def prefill(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache, temperature: Tensor,
                top_k: Tensor, top_p: Tensor, noise: Tensor | None, min_p: Tensor | None = None,
                scale: Tensor | None = None, add: Tensor | None = None) -> Tensor:
        """tokens/positions `[B, T]` -> next token ids `[B]` (noise None: every row is greedy; min_p,
        scale, add None: no row uses them, see `sampling.logit_adjustments`)."""
        with self._sdpa_choice():
            logits = adjust_logits(self.model(tokens, positions, cache, last_only=True)[:, -1], scale, add)
        return logits.argmax(-1) if noise is None else sample(logits, temperature, top_k, top_p, noise, min_p)

    def decode(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache, temperature: Tensor,
               top_k: Tensor, top_p: Tensor, noise: Tensor | None, min_p: Tensor | None = None,
               scale: Tensor | None = None, add: Tensor | None = None) -> Tensor:
        """tokens/positions `[B, 1]` -> next token ids `[B]` (noise None: every row is greedy; min_p,
        scale, add None: no row uses them, see `sampling.logit_adjustments`)."""
        with self._sdpa_choice():
            logits = adjust_logits(self.model(tokens, positions, cache)[:, -1], scale, add)
        return logits.argmax(-1) if noise is None else sample(logits, temperature, top_k, top_p, noise, min_p)

    def logits(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache) -> Tensor:
        with self._sdpa_choice():
            return self.model(tokens, positions, cache)


class Generator:
    """Generates from a `Transformer` with a static KV cache.

    `_prefill_impl` and `_decode_impl` (forward + sampling, `ModelSteps`) are the only model calls; with
    `compile=True` each runs under `torch.compile(fullgraph=True)`: prefill with a symbolic sequence
    length (one graph for all prompt lengths), decode with static shapes (one graph for all steps;
    a CUDA graph on CUDA). Greedy batches take an argmax-only variant of each graph.
    The compiled CPU decode step does not re-check the model's attributes at every call: once a
    Generator has run, its model must not be modified (swap modules or weights before, not after).
    `gemv_max_rows` (compiled CPU decode): matmuls with at most this many rows become streaming
    reductions; 0 leaves them to BLAS (the A/B of `fmstack bench --decode-compiler stock`).
    `compile_cache` (compiled): keep each compiled step in fmstack's compile cache
    (`fmstack.generation.compile_cache`) and load it from there in later processes."""

    def __init__(self, model: nn.Module, tokenizer=None, eos_ids: Sequence[int] | None = None, *,
                 compile: bool = False, sdpa_backend: str = "auto", max_seq_len: int | None = None,
                 gemv_max_rows: int = GEMV_MAX_ROWS, compile_cache: bool = True):
        self.model, self.tokenizer = model, tokenizer
        if eos_ids is None:
            eos_ids = sorted(tokenizer.eos_ids) if tokenizer is not None else []
        self.eos_ids = set(eos_ids)
        self.cache: StaticKVCache | None = None
        self.max_seq_len = max_seq_len  # fixed cache length (None: grow in CACHE_LEN_MULTIPLE steps)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Floating-point dtype of the cache: the activation dtype (int8 weights still run fp activations).
        if not self.dtype.is_floating_point:
            self.dtype = torch.float32
        self.sdpa_backends = sdpa_backends(sdpa_backend, self.device, masked=True)  # the cache masks
        steps = ModelSteps(model, self.sdpa_backends, auto=sdpa_backend == "auto")
        self._prefill_impl, self._decode_impl, self._logits_impl = steps.prefill, steps.decode, steps.logits
        if compile and not model.compiles_whole:  # a StagedCausalLM: its communication cannot be
            model.compile_stage()  # traced, so it compiles its own layers instead
            compile = False
        self.compiled = compile
        self._prefill_step, self._decode_step = self._prefill_impl, self._decode_impl
        store = CompileCache.for_model(model, self.dtype) if compile and compile_cache else None
        if compile:  # no process-wide settings here: `generate` raises the recompile limit while it runs
            # saved whole (`precompile`): a later process loads each step without tracing (docs/compile.md)
            saved = {"store": store, "precompile": True}
            self._prefill_step = compile_prefill(self._prefill_impl, "prefill", frozen_attribute="model", **saved)
            # Decode has static shapes: on CUDA it is captured as a CUDA graph; on CPU its batch-1
            # matmuls become streaming reductions (see fmstack.generation.compile).
            self._decode_step = compile_decode(self._decode_impl, self.device, gemv_max_rows,
                                               frozen_attribute="model", **saved)
        self._logits_few = self._logits_many = self._logits_impl
        if compile:  # T <= GEMV_MAX_ROWS: static graphs (one per T), like decode; longer: a symbolic length
            self._logits_few = compile_decode(self._logits_impl, self.device, frozen_attribute="model",
                                              what="forward (few tokens)", **saved)
            self._logits_many = compile_prefill(self._logits_impl, "forward", frozen_attribute="model", **saved)

    def decode_sdpa_backend(self, batch_size: int, seq_len: int) -> str:
        """The SDPA backend a decode step of `batch_size` rows over a `seq_len`-slot cache runs under
        this generator's `--sdpa-backend` (the cache always masks); benchmarks record it."""
        cfg = self.model.config
        q = torch.zeros(batch_size, cfg.n_heads, 1, cfg.head_dim, dtype=self.dtype, device=self.device)
        kv = torch.zeros(batch_size, cfg.n_kv_heads, seq_len, cfg.head_dim, dtype=self.dtype, device=self.device)
        mask = torch.ones(batch_size, 1, 1, seq_len, dtype=torch.bool, device=self.device)
        with sdpa_kernel(self.sdpa_backends):
            return sdpa_backend_name(q, kv, kv, mask)

    def logits(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache) -> Tensor:
        """Raw forward through the cache: tokens/positions `[B, T]` -> logits `[B, T, V]` (compiled
        when the generator is). Used where whole distributions are needed (speculative decoding)."""
        if tokens.shape[1] <= GEMV_MAX_ROWS:  # on CUDA a CUDA graph: its output buffer is reused by the next call
            out = self._logits_few(tokens, positions, cache)
            return out.clone() if self.compiled and self.device.type == "cuda" else out
        if self.compiled:
            mark_dynamic(tokens, 1)
            mark_dynamic(positions, 1)
        return self._logits_many(tokens, positions, cache)

    def _prefill(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache, *sampling: Tensor | None) -> Tensor:
        if tokens.shape[1] == 1:  # a one-token prompt is a decode step: reuse that graph
            return self._decode(tokens, positions, cache, *sampling)
        if self.compiled:  # one graph for every prompt length: the sequence dim is symbolic
            mark_dynamic(tokens, 1)
            mark_dynamic(positions, 1)
        return self._prefill_step(tokens, positions, cache, *sampling).clone()  # fed to decode: see _decode

    def _prebuild_decode(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache, *rest: Tensor | None) -> None:
        """A cold start: the decode step compiles in a background process while this one compiles the
        prefill step (`LoggedCompile.prebuild`; SmolLM2-135M, 2 cores: docs/compile.md). Nothing where
        the prefill step is stored already (a warm start) or is the decode step (one-token prompts)."""
        prefill, decode = self._prefill_step, self._decode_step
        if tokens.shape[1] == 1 or not (isinstance(prefill, LoggedCompile) and isinstance(decode, LoggedCompile)):
            return
        if prefill.ready(tokens, positions, cache, *rest):  # every later call of this process: nothing to check
            return
        mark_dynamic(tokens, 1)  # as `_prefill` marks them: the stored entry's key says so
        mark_dynamic(positions, 1)
        if not prefill.stored(tokens, positions, cache, *rest):
            step = torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)
            decode.prebuild(step, step.clone(), cache, *rest)

    def _decode(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache, *sampling: Tensor | None) -> Tensor:
        """One decode step -> next ids `[B]`, cloned: the loop feeds them into the next step, and under
        CUDA graphs (cudagraph trees) the next replay overwrites or frees this replay's outputs
        (pytorch issue 152887). The clone is B integers."""
        return self._decode_step(tokens, positions, cache, *sampling).clone()

    def _masked_step(self, matchers: list, tokens: Tensor, positions: Tensor, cache: StaticKVCache,
                     temperature: Tensor, top_k: Tensor, top_p: Tensor, noise: Tensor | None,
                     min_p: Tensor | None = None, scale: Tensor | None = None, add: Tensor | None = None) -> Tensor:
        """Prefill or decode with grammar masks (`--json-schema`): the forward, the constrained rows'
        masks on their logits, then the same adjustments and sampler as `ModelSteps.decode` (eager: the
        masks are host work)."""
        logits = self.logits(tokens, positions, cache)[:, -1].float()
        apply_masks(logits, matchers)
        logits = adjust_logits(logits, scale, add)
        return logits.argmax(-1) if noise is None else sample(logits, temperature, top_k, top_p, noise, min_p)

    def ensure_cache(self, batch_size: int, seq_len: int) -> StaticKVCache:
        cfg = self.model.config
        limit = self.max_seq_len or cfg.max_seq_len
        if seq_len > limit:
            raise ParameterError(f"prompt + max_new_tokens = {seq_len} tokens exceeds the "
                                 f"{'generator' if self.max_seq_len else 'model'}'s context length {limit}")
        length = self.max_seq_len or min(cfg.max_seq_len, -(-seq_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE)
        c = self.cache
        if c is None or c.batch_size != batch_size or c.max_seq_len < length:
            self.cache = None  # free the old one first
            self.cache = self.model.make_cache(batch_size, length, StaticKVCache, dtype=self.dtype, device=self.device)
        return self.cache

    # -- generation --------------------------------------------------------------------------------
    @with_recompile_limit  # compiled: Dynamo's process-wide recompile limit is raised while this runs
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_text: Callable[[int, str], None] | None = None,
                 constraints: Sequence[Constraint | None] | None = None) -> list[GenerationResult]:
        """Generate for each prompt (token ids); `on_text(row, delta)` streams text as it is produced;
        `constraints` (one per prompt, None for free rows): the output follows that grammar."""
        if not prompts:
            raise ParameterError("prompts must contain at least one prompt")
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ParameterError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ParameterError(f"prompt {i} is empty: at least one token is needed")
            if any((not isinstance(t, int)) or t < 0 or t >= self.model.config.vocab_size for t in p):
                raise ParameterError(f"prompt {i} has token ids outside [0, {self.model.config.vocab_size})")
        for p in plist:
            p.check_vocab(self.model.config.vocab_size)
        need_text = on_text is not None or any(p.stop for p in plist)
        if need_text and self.tokenizer is None:
            raise ParameterError("streaming and stop strings need a tokenizer")
        B, L = len(prompts), max(len(p) for p in prompts)
        max_new = max(p.max_new_tokens for p in plist)
        cache = self.ensure_cache(B, L + max_new)
        if constraints is not None and len(constraints) != len(prompts):
            raise ParameterError(f"got {len(constraints)} constraints for {len(prompts)} prompts")
        matchers = [c.matcher() if c is not None else None for c in constraints or [None] * B]
        rows = [_Row(p, StopChecker(p, self.eos_ids, self.tokenizer), matcher=m) for p, m in zip(plist, matchers)]
        prefill, decode = self._prefill, self._decode
        if any(m is not None for m in matchers):
            prefill = decode = lambda *a: self._masked_step(matchers, *a)  # noqa: E731
        dev = self.device
        pad = torch.tensor([L - len(p) for p in prompts], device=dev)
        tokens = torch.tensor([[0] * (L - len(p)) + list(p) for p in prompts], device=dev)
        positions = torch.arange(L, device=dev)[None, :] - pad[:, None]
        temperature, top_k, top_p = sampling_tensors(plist, dev)
        min_p = min_p_tensor(plist, dev)
        generators = [self._generator(p.seed) for p in plist]
        all_greedy = all(p.greedy for p in plist)

        for r in rows:
            if r.params.max_new_tokens == 0:
                r.done = True
        if all(r.done for r in rows):
            return [r.result for r in rows]

        t0 = time.perf_counter()
        cache.reset(pad)
        sampling = (temperature, top_k, top_p)
        vocab = self.model.config.vocab_size
        stop_ids = [r.stops.stop_ids for r in rows]

        def noise() -> Tensor | None:  # Exp(1) draws for the sampler; None selects the argmax-only graph
            return None if all_greedy else exponential_noise((B, vocab), generators, dev)

        def adjustments() -> tuple[Tensor | None, Tensor | None]:  # penalties/bias/min_tokens from host lists
            history = [list(p) + r.result.token_ids for p, r in zip(prompts, rows)]
            return logit_adjustments(plist, history, [len(p) for p in prompts], stop_ids, vocab, dev)

        rest = (*sampling, noise(), min_p, *adjustments())
        if prefill == self._prefill and max_new > 1:  # a decode step will follow
            self._prebuild_decode(tokens, positions, cache, *rest)
        next_ids = prefill(tokens, positions, cache, *rest)
        next_positions = torch.tensor([len(p) for p in prompts], device=dev)[:, None]
        t_first = None
        while True:
            ids_host = next_ids.tolist()  # the one host sync per step: stops and streaming need the ids
            if t_first is None:
                t_first = time.perf_counter()
            for i, (r, tok) in enumerate(zip(rows, ids_host)):
                if not r.done:
                    self._accept(i, r, tok, on_text)
            if all(r.done for r in rows):
                break
            next_ids = decode(next_ids[:, None], next_positions, cache, *sampling, noise(), min_p, *adjustments())
            next_positions = next_positions + 1
        t_end = time.perf_counter()
        for r in rows:
            r.result.prefill_s = t_first - t0
            r.result.decode_s = t_end - t_first
        return [r.result for r in rows]

    def _accept(self, i: int, r: _Row, tok: int, on_text: Callable[[int, str], None] | None) -> None:
        res = r.result
        res.token_ids.append(tok)  # a stop token is kept in token_ids, not in text
        delta = r.stops.add(tok)
        if r.matcher is not None and not r.stops.finished:
            r.matcher.accept(tok)
            if r.matcher.done:  # the grammar is complete
                delta += r.stops.end()
        if on_text and delta:
            on_text(i, delta)
        if r.stops.finished:
            r.done = True
            res.finish_reason, res.stop_reason, res.text = r.stops.finish_reason, r.stops.stop_reason, r.stops.text

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g
