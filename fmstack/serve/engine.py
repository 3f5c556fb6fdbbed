"""Continuous-batching engine over a paged KV cache (no HTTP here): the public entry point.

The work is split three ways (the vLLM v1 layout):
- `scheduler.Scheduler` decides each step's chunks (admission, KV blocks, preemption, prefix cache);
- `runner.ModelRunner` runs them (one flattened forward, logits only where needed, sampling);
- this `Engine` owns the queues' lock, the background thread and the outputs: it feeds the runner's
  tokens through each request's `StopChecker` (EOS, stop tokens/strings, max tokens, context length;
  text by incremental detokenization) and hands a `RequestOutput` to each request's callback.

Fault isolation: when a step raises, its chunks are run again one at a time (a paged step writes the
same K/V slots again, so this is idempotent); only the chunks that still fail end, with an error
output (`RequestOutput.error`), and their blocks are freed; the engine goes on. Only an error that
leaves the model or cache state unknown (an accelerator/CUDA error; see `is_fatal`) stops the
engine: `error` is set and every request gets an error output.

Thread model: `start()` runs steps on a background thread; `add_request` and `abort` may be called
from any thread. `abort` frees the request's blocks at once (the forward in flight does not use the
allocator, and a block freed mid-step is not handed out again before the step ends: only the
engine thread allocates).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Sequence as Seq

import torch
from torch import nn

from fmstack.errors import FmstackError, ParameterError
from fmstack.generation.compile_cache import CompileCache
from fmstack.generation.generate import sdpa_backends
from fmstack.generation.stopping import StopChecker
from fmstack.serve.paged_cache import BlockAllocator, PagedKVCache
from fmstack.serve.request import (MAX_LOGPROBS, RequestParams, RunnerOutput, SchedulerOutput, Sequence,
                                   TokenLogprob)
from fmstack.serve.runner import ModelRunner, decode_buckets
from fmstack.serve.scheduler import Scheduler
from fmstack.serve.speculation import NgramProposer, SpeculationConfig

__all__ = ["Engine", "EngineConfig", "EngineStats", "MAX_LOGPROBS", "PromptTooLong", "QueueFull", "RequestOutput",
           "RequestParams", "TokenLogprob", "is_fatal"]

log = logging.getLogger(__name__)

WARMUP_CHOICES = ("cached", "all", "none")


class QueueFull(FmstackError):
    """The waiting queue is at `max_queue`: the caller should retry later (HTTP 429)."""


class PromptTooLong(ParameterError):
    """prompt + max_tokens exceeds the engine's `max_model_len`."""


@dataclass
class RequestOutput:
    """What one step produced for a request. `text` is the new text (stop strings held back and cut);
    `prompt_logprobs` comes once, with the first output (entry 0 is None: nothing predicts it).
    `error` is set (with finish_reason "abort") when this request failed: its own step raised, or
    the engine died (then `Engine.error` is set too)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    finished: bool
    finish_reason: str | None  # "stop" (EOS, a stop token or a stop string) | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class EngineConfig:
    """block_size tokens per KV block; num_blocks blocks in all (block 0 reserved; None: sized from
    kv_cache_bytes); max_num_seqs running at once; max_num_batched_tokens per step; max_model_len
    tokens per sequence (prompt + completion); max_queue waiting requests before QueueFull."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    max_model_len: int | None = None
    max_queue: int = 256
    prefix_caching: bool = True
    compile: bool = False
    compile_cache: bool = True  # compiled: keep each graph in fmstack's compile cache (warm restarts)
    compile_backend: str | None = None  # compiled: another torch.compile backend than fmstack's (tests: "eager")
    sdpa_backend: str = "auto"
    threads: int | None = None  # torch CPU threads of the engine thread (None: torch's default)
    speculative: SpeculationConfig | None = None  # prompt-lookup speculation (None: off), see speculation.py

    def check(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ParameterError(f"threads={self.threads!r} is invalid: must be an integer >= 1")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ParameterError(f"{name}={v!r} is invalid: must be an integer >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ParameterError(f"max_model_len={self.max_model_len} is invalid: must be >= 2")


@dataclass
class EngineStats:
    running: int
    waiting: int
    blocks_used: int
    blocks_free: int
    blocks_total: int
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_hit_tokens: int
    preemptions: int
    finished: dict[str, int]
    steps: int
    failed: int = 0  # requests ended by an error (counted under finished["abort"] too)


def is_fatal(e: BaseException) -> bool:
    """True when, after `e`, the model or KV cache state is unknown, so the engine must stop: not an
    `Exception` (KeyboardInterrupt, SystemExit), an accelerator error, or a CUDA runtime error other
    than out-of-memory (an allocation that failed changed nothing)."""
    if not isinstance(e, Exception):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    if isinstance(e, torch.OutOfMemoryError):
        return False
    return isinstance(e, RuntimeError) and "CUDA" in str(e)


class Engine:
    """Continuous batching for one `Transformer` (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        config.check()
        self.model, self.tokenizer = model, tokenizer
        mcfg = model.config
        p = next(model.parameters())
        self.device = p.device
        self.dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        self.max_model_len = min(config.max_model_len or mcfg.max_seq_len, mcfg.max_seq_len)
        if config.max_model_len and config.max_model_len > mcfg.max_seq_len:
            raise ParameterError(f"max_model_len={config.max_model_len} exceeds the model's context length "
                                 f"{mcfg.max_seq_len}")
        num_blocks = self._num_blocks(mcfg)
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.prefix_caching)
        self.cache = PagedKVCache(mcfg, num_blocks, config.block_size, self.dtype, self.device)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens)
        store = CompileCache.for_model(model, self.dtype) if config.compile and config.compile_cache else None
        self.runner = ModelRunner(model, self.cache, sdpa_backends(config.sdpa_backend, self.device, masked=True),
                                  config.compile, decode_buckets(config.max_num_seqs) if config.compile else (), store,
                                  config.compile_backend)
        self.speculator = NgramProposer(config.speculative) if config.speculative is not None else None
        self.eos_ids = set(tokenizer.eos_ids) if tokenizer is not None else set()
        self.vocab_size = mcfg.vocab_size
        self.seqs: dict[str, Sequence] = {}
        self._held: dict[str, list[Sequence]] = {}  # request id -> requests waiting for its prompt (add_request)
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.n_prompt_tokens = self.n_generated = self.n_steps = self.n_failed = 0
        self.n_finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        log.info("paged KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len %d, max_num_seqs %d",
                 num_blocks - 1, config.block_size, self.cache.nbytes / 2**20, self.max_model_len,
                 config.max_num_seqs)

    def _num_blocks(self, mcfg) -> int:
        """Blocks in the cache (block 0 reserved): config.num_blocks, else as many as kv_cache_bytes
        holds, at most max_num_seqs full-length sequences; at least one full-length sequence."""
        config, bs = self.config, self.config.block_size
        per_seq = -(-self.max_model_len // bs)
        num_blocks = config.num_blocks
        if num_blocks is None:
            by_bytes = config.kv_cache_bytes // PagedKVCache.bytes_per_block(mcfg, bs, self.dtype)
            num_blocks = int(min(by_bytes, config.max_num_seqs * per_seq)) + 1
        if num_blocks - 1 < per_seq:
            raise ParameterError(f"the KV cache has {num_blocks - 1} blocks of {bs} tokens, fewer than one "
                                 f"sequence of max_model_len={self.max_model_len} needs ({per_seq}); "
                                 "raise the cache size or lower max_model_len")
        return num_blocks

    # -- requests ----------------------------------------------------------------------------------
    def _check_prompt(self, prompt: list[int], params: RequestParams) -> None:
        if not prompt:
            raise ParameterError("prompt is empty: at least one token is needed")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ParameterError(f"prompt has token ids outside [0, {self.vocab_size}): {bad[:5]}")
        need = len(prompt) + params.sampling.max_new_tokens
        if need > self.max_model_len:
            raise PromptTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{need} tokens ({len(prompt)} in the prompt, {params.sampling.max_new_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.")
        params.sampling.check_vocab(self.vocab_size)
        if params.sampling.stop and self.tokenizer is None:
            raise ParameterError("stop strings need a model with a tokenizer")

    def add_request(self, request_id: str, prompt: Seq[int], params: RequestParams,
                    callback: Callable[[RequestOutput], None], after: str | None = None) -> None:
        """Queue a request. Raises PromptTooLong / ParameterError for bad input, QueueFull when full.
        `after`: the id of a request with the same prompt (another choice of it, `n` > 1); this one
        waits until that one's prompt is computed, so its blocks come from the prefix cache."""
        prompt = list(prompt)
        self._check_prompt(prompt, params)
        with self.lock:
            if self.error is not None:
                raise FmstackError(f"the engine stopped after an error: {self.error}")
            if request_id in self.seqs:
                raise ParameterError(f"request id {request_id!r} is already in use")
            if len(self.scheduler.waiting) >= self.config.max_queue:
                raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            stops = StopChecker(params.sampling, self.eos_ids, self.tokenizer, stop_token_ids=params.stop_token_ids,
                                prompt_len=len(prompt), max_len=self.max_model_len)
            seq = Sequence(request_id, prompt, params, next(self._arrivals), stops=stops, callback=callback,
                           device=self.device)
            self.seqs[request_id] = seq
            self.n_prompt_tokens += len(prompt)
            if params.sampling.max_new_tokens == 0 and params.prompt_logprobs is None:
                self._finish(seq, "length")  # nothing to compute
                self._emit(seq, [], "", None)
                return
            first = self.seqs.get(after) if after is not None else None
            if first is not None and first.num_computed < first.prompt_len and not first.finished:
                self._held.setdefault(after, []).append(seq)
                return
            self.scheduler.add(seq)
            self._wake.notify()

    def _release(self, seq: Sequence) -> None:
        """Queue the requests held for `seq` (its prompt is computed, or it ended)."""
        for held in self._held.pop(seq.id, []):
            if not held.finished:
                self.scheduler.add(held)

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks now; its callback gets no more outputs. False if unknown."""
        with self.lock:
            seq = self.seqs.get(request_id)
            if seq is None or seq.finished:
                return False
            self._finish(seq, "abort")
            return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        with self.lock:
            a, s = self.allocator, self.scheduler
            return EngineStats(len(s.running), len(s.waiting), a.num_used, a.num_free, a.num_blocks - 1,
                               self.n_prompt_tokens, self.n_generated, s.n_prefix_hits, s.n_preemptions,
                               dict(self.n_finished), self.n_steps, self.n_failed)

    def warm_up(self, which: str = "cached") -> list[int]:
        """Compile the step graphs now instead of at the first request that needs each (compiled
        engines only; padding rows only, which touch no sequence's blocks): `which` "all" every
        decode bucket, "cached" those already in the compile cache (loading them), "none" nothing;
        the flattened (prefill) step with either. Returns the decode buckets warmed."""
        if which not in WARMUP_CHOICES:
            raise ParameterError(f"warmup={which!r} is invalid: choose one of {', '.join(WARMUP_CHOICES)}")
        if not self.runner.compiled or which == "none":
            return []
        buckets = [b for b in self.runner.buckets if which == "all" or self.runner.is_stored(b)]
        log.info("warming up the compiled engine: decode batch buckets %s (of %s) and the prefill step",
                 buckets, list(self.runner.buckets))
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        self.runner.warm_up(buckets)
        return buckets

    # -- background loop ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="fmstack-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self.lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        if self.config.threads is not None:  # OpenMP settings are per thread: set them on this one
            torch.set_num_threads(self.config.threads)
        try:
            while True:
                with self.lock:
                    while not self._stop and not self.has_work():
                        self._wake.wait()
                    if self._stop:
                        return
                self.step()
        except BaseException as e:  # noqa: BLE001 - only fatal errors get here: fail every request, stay dead
            log.exception("engine step failed; the engine stops")
            with self.lock:
                self.error = e
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._fail(seq, f"the engine failed: {e}")

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> int:
        """One scheduling round + forward + sampling + outputs. Returns the number of tokens run.
        Raises only errors `is_fatal` calls fatal; others end the requests responsible."""
        with self.lock:
            if self.speculator is not None:
                self.speculator.propose(self.scheduler.running)
            scheduled = self.scheduler.schedule()
            if not scheduled.chunks:
                return 0
        output = self._execute(scheduled)
        with self.lock:
            self.n_steps += 1
            self._process(scheduled, output)
        return scheduled.num_tokens

    def _execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        """Run the step; if it raises (non-fatal), run its chunks one at a time and mark the ones that
        still raise as failed."""
        try:
            return self.runner.execute(scheduled)
        except Exception as e:  # noqa: BLE001 - isolated below
            if is_fatal(e):
                raise
            if len(scheduled.chunks) == 1:
                log.exception("step of request %s failed", scheduled.chunks[0].seq.id)
                return RunnerOutput(failed={scheduled.chunks[0].seq.id: f"{type(e).__name__}: {e}"})
            log.warning("a step of %d requests failed (%s: %s); running them one at a time",
                        len(scheduled.chunks), type(e).__name__, e)
        merged = RunnerOutput()
        for chunk in scheduled.chunks:
            merged.merge(self._execute(SchedulerOutput([chunk])))
        return merged

    def _process(self, scheduled: SchedulerOutput, output: RunnerOutput) -> None:
        """Failures, prompt logprobs, scheduler bookkeeping, then each new token's stops and output."""
        for c in scheduled.chunks:
            seq = c.seq
            if seq.finished:  # aborted while the forward ran
                continue
            if seq.id in output.failed:
                self._fail(seq, output.failed[seq.id])
            elif seq.id in output.prompt_logprobs:
                for j, entry in enumerate(output.prompt_logprobs[seq.id]):
                    if entry is not None and len(seq.prompt_lps) == c.start + j + 1:  # not seen before a preemption
                        seq.prompt_lps.append(entry)
        if self.speculator is not None:
            self.speculator.record((len(c.draft), len(output.accepted.get(c.seq.id, ()))) for c in scheduled.chunks
                                   if c.draft and c.seq.id in output.sampled)
        grew = self.scheduler.update_from_output(scheduled, output)
        for c in scheduled.chunks:
            if c.seq.id in self._held and c.seq.num_computed >= c.seq.prompt_len:
                self._release(c.seq)
        for c in scheduled.chunks:  # echo-only requests end once their prompt logprobs are done
            seq = c.seq
            if not seq.finished and seq.params.sampling.max_new_tokens == 0 and seq.num_computed == seq.num_tokens:
                self._finish(seq, "length")
                self._emit(seq, [], "", None)
        for seq in grew:
            try:
                self._accept(seq, output.accepted.get(seq.id, []) + [seq.tokens[-1]], output.logprobs.get(seq.id))
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer that cannot decode: this request only
                log.exception("output of request %s failed", seq.id)
                self._fail(seq, f"{type(e).__name__}: {e}")

    def _accept(self, seq: Sequence, toks: list[int], logprob: TokenLogprob | None) -> None:
        """The step's new tokens of `seq` (several after accepted speculative proposals), in order,
        through its stops and grammar; tokens after the one that finishes it are dropped."""
        text, taken = "", []
        for tok in toks:
            self.n_generated += 1
            taken.append(tok)
            text += seq.stops.add(tok)
            if seq.matcher is not None and not seq.stops.finished:
                seq.matcher.accept(tok)
                if seq.matcher.done:  # the grammar is complete: nothing but EOS could follow
                    text += seq.stops.end()
            if seq.stops.finished:
                break
        if len(taken) < len(toks):
            del seq.tokens[len(taken) - len(toks):]
        if seq.stops.finished:
            self._finish(seq, seq.stops.finish_reason)
        self._emit(seq, taken, text, None if logprob is None else [logprob])

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished, take it off the queues and free its blocks."""
        self.scheduler.finish(seq, reason)
        self.n_finished[reason] = self.n_finished.get(reason, 0) + 1
        self.seqs.pop(seq.id, None)
        self._release(seq)

    def _fail(self, seq: Sequence, message: str) -> None:
        """End `seq` with an error output (finish_reason "abort", `error` = message)."""
        self.n_failed += 1
        self._finish(seq, "abort")
        self._emit(seq, [], "", None, error=message)

    def _emit(self, seq: Sequence, token_ids: list[int], text: str, lp, error: str | None = None) -> None:
        if seq.finish_reason == "abort" and error is None:
            return
        plp = None
        if seq.prompt_lps is not None and not seq.prompt_sent:
            plp, seq.prompt_sent = seq.prompt_lps, True
        out = RequestOutput(seq.id, token_ids, text, lp, plp, seq.finished, seq.finish_reason,
                            seq.prompt_len, seq.generated, error)
        try:
            seq.callback(out)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
            log.exception("output callback of request %s failed", seq.id)
