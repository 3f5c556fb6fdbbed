"""Continuous-batching engine over a paged KV cache (no HTTP here).

Requests wait in `waiting`, run in `running`. Each `step()`:
1. schedules: running sequences first (decode tokens before prefill chunks, in arrival order), each
   given blocks for its new tokens; when blocks run out the latest-arrived running sequence is
   preempted (its blocks freed; it goes back to the front of `waiting` and is recomputed later).
   Then waiting sequences are admitted, oldest first, while there are free blocks for their whole
   current token list, a free seat (`max_num_seqs`) and token budget (`max_num_batched_tokens`);
   prompts are split into chunks to fit the budget, and full blocks found in the prefix cache are
   reused instead of recomputed.
2. runs one forward over all scheduled tokens (prefill chunks and decode tokens flattened into one
   row, see `paged_cache`) and computes logits only where they are needed;
3. samples with each request's own parameters, checks stops (EOS, stop strings, max tokens, length
   limit) and hands a `RequestOutput` to each request's callback.

Thread model: `start()` runs steps on a background thread; `add_request` and `abort` may be called
from any thread. `abort` frees the request's blocks at once (the forward in flight does not use the
allocator, and a block freed mid-step is not handed out again before the step ends).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import sdpa_kernel

from fmstack.errors import FmstackError, ParameterError
from fmstack.generation.generate import sdpa_backends
from fmstack.generation.stopping import IncrementalDetokenizer
from fmstack.generation.sampling import SamplingParams, filtered_probs, draw
from fmstack.serve.paged_cache import (AttnGroup, BlockAllocator, PagedKVCache, StepMeta, build_group,
                                       chain_hashes)

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20


class QueueFull(FmstackError):
    """The waiting queue is at `max_queue`: the caller should retry later (HTTP 429)."""


class PromptTooLong(ParameterError):
    """prompt + max_tokens exceeds the engine's `max_model_len`."""


@dataclass(frozen=True)
class RequestParams:
    """Sampling (max tokens, temperature, top-k/p, seed, stop strings) plus outputs wanted:
    `logprobs` top-k alternatives per generated token (None: no logprobs), `prompt_logprobs`
    the same for prompt tokens (echo)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise ParameterError(f"{name}={v!r} is invalid: must be an integer in [0, {MAX_LOGPROBS}]")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-k alternatives (id, logprob), best first


@dataclass
class RequestOutput:
    """What one step produced for a request. `text` is the new text (stop strings held back and cut);
    `prompt_logprobs` comes once, with the first output (entry 0 is None: nothing predicts it)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop string) | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int


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
    sdpa_backend: str = "auto"
    threads: int | None = None  # torch CPU threads of the engine thread (None: torch's default)

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


class _Seq:
    __slots__ = ("id", "arrival", "prompt_len", "tokens", "params", "callback", "num_computed", "blocks",
                 "n_hashed", "parent_hash", "detok", "generated", "logprobs_out", "prompt_lps", "prompt_sent",
                 "generator", "finished", "finish_reason", "preemptions")

    def __init__(self, rid: str, prompt: list[int], params: RequestParams, callback, tokenizer, arrival: int,
                 device: torch.device):
        self.id, self.arrival, self.params, self.callback = rid, arrival, params, callback
        self.prompt_len = len(prompt)
        self.tokens = list(prompt)
        self.num_computed = 0
        self.blocks: list[int] = []
        self.n_hashed = 0  # leading blocks registered in the prefix cache
        self.parent_hash: int | None = None
        self.detok = IncrementalDetokenizer(tokenizer, params.sampling.stop) if tokenizer is not None else None
        self.generated = 0
        self.prompt_lps: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_sent = False
        self.generator = None
        if params.sampling.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.sampling.seed)
        self.finished = False
        self.finish_reason: str | None = None
        self.preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_lps is not None and len(self.prompt_lps) < self.prompt_len


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
        bs = config.block_size
        per_seq = -(-self.max_model_len // bs)
        num_blocks = config.num_blocks
        if num_blocks is None:
            by_bytes = config.kv_cache_bytes // PagedKVCache.bytes_per_block(mcfg, bs, self.dtype)
            num_blocks = int(min(by_bytes, config.max_num_seqs * per_seq)) + 1
        if num_blocks - 1 < per_seq:
            raise ParameterError(f"the KV cache has {num_blocks - 1} blocks of {bs} tokens, fewer than one "
                                 f"sequence of max_model_len={self.max_model_len} needs ({per_seq}); "
                                 "raise the cache size or lower max_model_len")
        self.allocator = BlockAllocator(num_blocks, bs, config.prefix_caching)
        self.cache = PagedKVCache(mcfg, num_blocks, bs, self.dtype, self.device)
        self.eos_ids = set(tokenizer.eos_ids) if tokenizer is not None else set()
        self.vocab_size = mcfg.vocab_size
        self.backends = sdpa_backends(config.sdpa_backend, self.device)
        self._forward = self._forward_impl
        if config.compile:
            self._forward = torch.compile(self._forward_impl, fullgraph=True)
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.seqs: dict[str, _Seq] = {}
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.n_prompt_tokens = self.n_generated = self.n_prefix_hits = self.n_preemptions = self.n_steps = 0
        self.n_finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        log.info("paged KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len %d, max_num_seqs %d",
                 num_blocks - 1, bs, self.cache.nbytes / 2**20, self.max_model_len, config.max_num_seqs)

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Sequence[int], params: RequestParams,
                    callback: Callable[[RequestOutput], None]) -> None:
        """Queue a request. Raises PromptTooLong / ParameterError for bad input, QueueFull when full."""
        prompt = list(prompt)
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
        if params.sampling.stop and self.tokenizer is None:
            raise ParameterError("stop strings need a model with a tokenizer")
        with self.lock:
            if self.error is not None:
                raise FmstackError(f"the engine stopped after an error: {self.error}")
            if request_id in self.seqs:
                raise ParameterError(f"request id {request_id!r} is already in use")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            seq = _Seq(request_id, prompt, params, callback, self.tokenizer, next(self._arrivals), self.device)
            self.seqs[request_id] = seq
            self.n_prompt_tokens += len(prompt)
            if params.sampling.max_new_tokens == 0 and params.prompt_logprobs is None:
                self._finish(seq, "length")  # nothing to compute
                self._emit(seq, [], "", None)
                return
            self.waiting.append(seq)
            self._wake.notify()

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks now; its callback gets no more outputs. False if unknown."""
        with self.lock:
            seq = self.seqs.get(request_id)
            if seq is None or seq.finished:
                return False
            self._finish(seq, "abort")
            return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        with self.lock:
            a = self.allocator
            return EngineStats(len(self.running), len(self.waiting), a.num_used, a.num_free, a.num_blocks - 1,
                               self.n_prompt_tokens, self.n_generated, self.n_prefix_hits, self.n_preemptions,
                               dict(self.n_finished), self.n_steps)

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
        except BaseException as e:  # noqa: BLE001 - fail every request, then stay dead
            log.exception("engine step failed")
            with self.lock:
                self.error = e
                for seq in list(self.running) + list(self.waiting):
                    self._finish(seq, "abort")
                    self._emit(seq, [], "", None, error=True)

    # -- scheduling --------------------------------------------------------------------------------
    def _reserve(self, seq: _Seq, n_tokens: int) -> bool:
        """Give `seq` blocks for its first `n_tokens` tokens; False (nothing taken) if too few are free."""
        need = -(-n_tokens // self.config.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        seq.blocks.extend(self.allocator.allocate() for _ in range(need))
        return True

    def _free_blocks(self, seq: _Seq) -> None:
        self.allocator.release_all(seq.blocks)
        seq.blocks, seq.num_computed, seq.n_hashed, seq.parent_hash = [], 0, 0, None

    def _preempt(self, seq: _Seq) -> None:
        """Recompute preemption: drop the KV, keep the tokens; back to the front of the queue."""
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.preemptions += 1
        self.n_preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted %s (%d tokens)", seq.id, seq.num_tokens)

    def _match_prefix(self, seq: _Seq) -> list[int]:
        """Cached blocks for the leading full blocks of seq's tokens (at least one token is left to compute)."""
        if not self.config.prefix_caching or seq.wants_prompt_logprobs:
            return []
        bs = self.config.block_size
        hits = []
        for key in chain_hashes(seq.tokens, bs, (seq.num_tokens - 1) // bs):
            block = self.allocator.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def schedule(self) -> list[tuple[_Seq, int]]:
        """Pick this step's (sequence, new token count) pairs; see the module docstring."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        chosen: set[int] = set()
        for decode_pass in (True, False):
            i = 0
            while i < len(self.running) and budget > 0:
                seq = self.running[i]
                remaining = seq.num_tokens - seq.num_computed
                if id(seq) in chosen or (remaining == 1) != decode_pass:
                    i += 1
                    continue
                n = min(remaining, budget)
                if self._reserve(seq, seq.num_computed + n):
                    scheduled.append((seq, n))
                    chosen.add(id(seq))
                    budget -= n
                    i += 1
                    continue
                victims = [s for s in reversed(self.running) if id(s) not in chosen and s is not seq]
                victim = victims[0] if victims else seq
                self._preempt(victim)  # seq's index is unchanged unless seq itself went
        bs = self.config.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = self._match_prefix(seq)
            hits_free = sum(1 for b in hits if self.allocator.refs[b] == 0)
            need = -(-seq.num_tokens // bs) - len(hits)
            if need > self.allocator.num_free - hits_free:
                break
            self.waiting.popleft()
            for b in hits:
                self.allocator.share(b)
            seq.blocks = list(hits)
            seq.n_hashed = len(hits)
            if hits:
                seq.parent_hash = hash(chain_hashes(seq.tokens, bs, len(hits))[-1])
            seq.num_computed = len(hits) * bs
            self.n_prefix_hits += seq.num_computed
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):  # cannot happen: checked above
                raise RuntimeError("block accounting error")
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    # -- the step ----------------------------------------------------------------------------------
    def _forward_impl(self, tokens: Tensor, positions: Tensor, cache: PagedKVCache, slot_mapping: Tensor,
                      out_index: Tensor, groups: list[tuple[Tensor, Tensor, Tensor]], logit_index: Tensor) -> Tensor:
        """tokens/positions `[1, T]` -> logits `[N, V]` (fp32) at the flat indices `logit_index [N]`."""
        meta = StepMeta(slot_mapping, out_index, tuple(AttnGroup(*g) for g in groups))
        with sdpa_kernel(self.backends):
            h = self.model.hidden_states(tokens, positions, cache.view(meta))
        return self.model.output(h[0, logit_index]).float()

    def _build(self, scheduled: list[tuple[_Seq, int]]):
        """Host-side step inputs: flat tokens/positions, slot mapping, groups, logit rows wanted."""
        bs = self.config.block_size
        toks, pos, slots = [], [], []
        decode, prefill = [], []
        logit_rows: list[int] = []
        per_seq: list[tuple[_Seq, int, int, int]] = []  # seq, flat offset, n, first logit row
        off = 0
        for seq, n in scheduled:
            p0 = seq.num_computed
            toks.extend(seq.tokens[p0:p0 + n])
            pos.extend(range(p0, p0 + n))
            slots.extend(seq.blocks[p // bs] * bs + p % bs for p in range(p0, p0 + n))
            (decode if n == 1 else prefill).append((off, p0, n, seq.blocks))
            first = len(logit_rows)
            all_rows = seq.wants_prompt_logprobs
            if all_rows:
                logit_rows.extend(range(off, off + n))
            elif p0 + n == seq.num_tokens:
                logit_rows.append(off + n - 1)
            per_seq.append((seq, off, n, first, all_rows))
            off += n
        groups, out_index, base = [], [0] * off, 0
        for chunks in (decode, prefill):
            if not chunks:
                continue
            g = build_group(chunks, bs, self.device)
            Q = g.q_index.shape[1]
            for s, (o, _, n, _) in enumerate(chunks):
                for j in range(n):
                    out_index[o + j] = base + s * Q + j
            base += len(chunks) * Q
            groups.append(g)
        dev = self.device
        t = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        meta = StepMeta(t(slots), t(out_index), tuple(groups))
        return t(toks)[None], t(pos)[None], meta, t(logit_rows), per_seq

    @torch.inference_mode()
    def step(self) -> int:
        """One scheduling round + forward + sampling. Returns the number of tokens run."""
        with self.lock:
            scheduled = self.schedule()
            if not scheduled:
                return 0
            tokens, positions, meta, logit_index, per_seq = self._build(scheduled)
        if self.config.compile:
            meta.mark_dynamic()
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
            torch._dynamo.maybe_mark_dynamic(positions, 1)
            torch._dynamo.maybe_mark_dynamic(logit_index, 0)
        groups = [(g.q_index, g.q_pos, g.kv_slots) for g in meta.groups]
        logits = self._forward(tokens, positions, self.cache, meta.slot_mapping, meta.out_index, groups,
                               logit_index) if logit_index.numel() else None
        with self.lock:
            self.n_steps += 1
            self._postprocess(per_seq, logits)
        return tokens.shape[1]

    def _postprocess(self, per_seq, logits: Tensor | None) -> None:
        bs = self.config.block_size
        samplers: list[tuple[_Seq, int]] = []  # seq, logit row to sample from
        for seq, off, n, first, all_rows in per_seq:
            if seq.finished:  # aborted while the forward ran
                continue
            p0 = seq.num_computed
            if all_rows:
                self._prompt_logprobs(seq, logits[first:first + n], p0)
            seq.num_computed = p0 + n
            n_full = seq.num_computed // bs
            while seq.n_hashed < n_full:  # register newly completed blocks for prefix reuse
                key = (0 if seq.parent_hash is None else seq.parent_hash,
                       tuple(seq.tokens[seq.n_hashed * bs:(seq.n_hashed + 1) * bs]))
                self.allocator.register(seq.blocks[seq.n_hashed], key)
                seq.parent_hash = hash(key)
                seq.n_hashed += 1
            if seq.num_computed < seq.num_tokens:
                continue  # mid-prompt chunk
            if seq.params.sampling.max_new_tokens == 0:  # echo-only request: prompt logprobs done
                self._finish(seq, "length")
                self._emit(seq, [], "", None)
                continue
            samplers.append((seq, first + n - 1 if all_rows else first))
        if samplers:
            self._sample(samplers, logits)

    def _prompt_logprobs(self, seq: _Seq, rows: Tensor, p0: int) -> None:
        """rows `[n, V]`: logits at positions p0..p0+n-1; position p predicts prompt token p+1."""
        k = seq.params.prompt_logprobs
        lp = rows.log_softmax(-1)
        n = rows.shape[0]
        targets = [seq.tokens[p + 1] if p + 1 < seq.prompt_len else -1 for p in range(p0, p0 + n)]
        valid = [j for j, t in enumerate(targets) if t >= 0 and len(seq.prompt_lps) <= p0 + j + 1]
        if not valid:
            return
        idx = torch.tensor(valid)
        tgt = torch.tensor([targets[j] for j in valid])
        chosen = lp[idx, tgt].tolist()
        top_v, top_i = (lp[idx].topk(k, dim=-1) if k > 0 else (None, None))
        for r, j in enumerate(valid):
            if len(seq.prompt_lps) != p0 + j + 1:
                continue
            top = list(zip(top_i[r].tolist(), top_v[r].tolist())) if k > 0 else []
            seq.prompt_lps.append(TokenLogprob(targets[j], chosen[r], top))

    def _sample(self, samplers: list[tuple[_Seq, int]], logits: Tensor) -> None:
        rows = logits[torch.tensor([r for _, r in samplers], device=logits.device)]  # [B, V]
        params = [s.params.sampling for s, _ in samplers]
        if all(p.greedy for p in params):
            next_ids = rows.argmax(-1)
        else:
            dev = rows.device
            temperature = torch.tensor([p.temperature for p in params], device=dev)
            top_k = torch.tensor([p.top_k for p in params], device=dev)
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            noise = torch.stack([torch.empty(rows.shape[1], device=dev).exponential_(generator=s.generator)
                                 for s, _ in samplers])
            probs = filtered_probs(rows, temperature, top_k, top_p)
            next_ids = torch.where(temperature == 0, rows.argmax(-1), draw(probs, noise))
        want_lp = [s.params.logprobs is not None for s, _ in samplers]
        lps = rows.log_softmax(-1) if any(want_lp) else None
        ids = next_ids.tolist()
        for i, ((seq, _), tok) in enumerate(zip(samplers, ids)):
            lp_entry = None
            if want_lp[i]:
                k = seq.params.logprobs
                top = []
                if k > 0:
                    v, ix = lps[i].topk(k)
                    top = list(zip(ix.tolist(), v.tolist()))
                lp_entry = [TokenLogprob(tok, lps[i, tok].item(), top)]
            self._accept(seq, tok, lp_entry)

    def _accept(self, seq: _Seq, tok: int, lp_entry) -> None:
        sp = seq.params.sampling
        seq.tokens.append(tok)
        seq.generated += 1
        self.n_generated += 1
        reason, text = None, ""
        if (tok in self.eos_ids and not sp.ignore_eos) or tok in seq.params.stop_token_ids:
            reason = "stop"
        elif seq.detok is not None:
            text = seq.detok.add(tok)
            if seq.detok.stopped:
                reason = "stop"
        if reason is None and (seq.generated >= sp.max_new_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if seq.detok is not None:
                text += seq.detok.flush()
            self._finish(seq, reason)
        self._emit(seq, [tok], text, lp_entry)

    def _finish(self, seq: _Seq, reason: str) -> None:
        """Mark finished, take it off the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finished, seq.finish_reason = True, reason
        self.n_finished[reason] = self.n_finished.get(reason, 0) + 1
        self._free_blocks(seq)
        self.seqs.pop(seq.id, None)

    def _emit(self, seq: _Seq, token_ids: list[int], text: str, lp, error: bool = False) -> None:
        if seq.finish_reason == "abort" and not error:
            return
        plp = None
        if seq.prompt_lps is not None and not seq.prompt_sent:
            plp, seq.prompt_sent = seq.prompt_lps, True
        out = RequestOutput(seq.id, token_ids, text, lp, plp, seq.finished, seq.finish_reason,
                            seq.prompt_len, seq.generated)
        try:
            seq.callback(out)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
            log.exception("output callback of request %s failed", seq.id)
