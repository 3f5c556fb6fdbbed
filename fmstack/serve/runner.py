"""Runs one engine step on the model: host-built inputs from a `SchedulerOutput` -> one forward over
all scheduled tokens, logits only where they are needed -> prompt logprobs and sampling -> a
`RunnerOutput`.

Two layouts (see `paged_cache`): a pure-decode step (every sequence one token, the common step under
load) is a `[B, 1]` batch; compiled, B is padded to a bucket (1, 2, 4, ..., max_num_seqs) and each
bucket is a static graph built by `Generator`'s decode compiler (on CPU its matmuls of <= 8 rows
stream the weights as reductions), so the engine never compiles per batch size: the key length is the
one symbolic size. Any other step (a prefill chunk among its sequences) is flattened into `[1, T]`
with every size symbolic: one graph, once its padded layout keeps every size >= 2 and it was first
traced with all sizes distinct (`warm_up`), since Dynamo specializes sizes 0 and 1 and, at the first
trace, sizes that happen to be equal. Why: the one flattened graph with sizes marked dynamic
recompiled for every new batch size a server met (326 s of compiling in the first 16-client pass of
SmolLM2-135M, issue fast-default), and a dynamic batch cannot take the streaming-reduction matmuls.

Nothing produced by one (possibly compiled) forward is fed to the next: every step's inputs are
built from host lists, and the output holds host values only (`.tolist()`), so a CUDA-graph replay
that reuses its output buffers cannot change a result already handed out. The runner keeps no
per-request state; seeded requests bring their own `torch.Generator` on the sequence.
"""

from __future__ import annotations

import functools
import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from fmstack.backends import LoggedCompile, maybe_mark_dynamic, raise_recompile_limit
from fmstack.errors import ParameterError
from fmstack.generation.compile import compile_decode, compile_prefill
from fmstack.generation.compile_cache import CompileCache
from fmstack.generation.generate import SDPA_BACKENDS, ModelSteps
from fmstack.generation.sampling import logit_adjustments, sample_rows
from fmstack.generation.structured import apply_masks, fill_masks
from fmstack.models.llama import scale_logits
from fmstack.serve.paged_cache import NULL_BLOCK, PagedKVCache, StepMeta, build_decode, build_group
from fmstack.serve.request import RunnerOutput, ScheduledChunk, SchedulerOutput, TokenLogprob
from fmstack.serve.speculation import verify_drafts

log = logging.getLogger(__name__)

DECODE_STEP = "engine decode step"  # the compile cache's name for the decode graphs


@dataclass
class StepInputs:
    """tokens/positions `[1, T]`, the paged-attention metadata, logit_index `[N]` (flat rows whose
    logits are computed) and first_row: each chunk's first row in the logits `[N, V]`."""

    tokens: Tensor
    positions: Tensor
    meta: StepMeta
    logit_index: Tensor
    first_row: list[int]


def padding_chunks(block_size: int) -> list[ScheduledChunk]:
    """Chunks of a flattened step that touch only the null block (null-block tables): three one-token
    chunks at position d and two prefill chunks of Q and Q - 1 tokens from position p, chosen so that
    every size of the step (sequences per group, Q, tokens, logit rows, key lengths) differs."""
    def key_len(n: int) -> int:
        return max(-(-n // block_size), -(-2 // block_size)) * block_size

    span = range(2 * block_size + 8)
    for d, p, q in itertools.product(span, span, range(6, 16)):
        if len({3, 2, q, 3 + 2 * q - 1, 5, key_len(d + 1), key_len(p + q)}) == 7:
            break
    else:  # unreachable: with d = 0 and p + q past the first blocks every size differs
        raise RuntimeError(f"no distinct padding sizes for block_size={block_size}")
    table = (NULL_BLOCK,) * -(-max(d + 1, p + q) // block_size)
    return ([ScheduledChunk(None, d, (0,), table, False, True)] * 3
            + [ScheduledChunk(None, p, (0,) * n, table, False, True) for n in (q, q - 1)])


def decode_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the compiled decode step is built for: powers of two below `max_batch`, then
    `max_batch` itself (a decode of B sequences runs padded to the smallest bucket >= B)."""
    if max_batch < 1:
        raise ParameterError(f"max_batch={max_batch} is invalid: must be >= 1")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return (*buckets, max_batch)


class EngineSteps(ModelSteps):
    """The engine's two model calls (what torch.compile wraps), on `Generator`'s `ModelSteps`: an
    instance holds only what they read (the model, the `--sdpa-backend` choice), so a step saved whole
    carries no runner state in its guards. The paged-attention inputs are set on the cache before each
    call (`PagedKVCache.set_step` / `set_decode`)."""

    def step(self, tokens: Tensor, positions: Tensor, cache: PagedKVCache, logit_index: Tensor) -> Tensor:
        """tokens/positions `[1, T]` (a flattened step) -> logits `[N, V]` (fp32) at the flat indices
        `logit_index [N]`."""
        with self._sdpa_choice():
            h = self.model.hidden_states(tokens, positions, cache.stepping)
        return scale_logits(self.model.output(h[0, logit_index]), self.model.config).float()

    def decode(self, tokens: Tensor, positions: Tensor, cache: PagedKVCache) -> Tensor:
        """tokens/positions `[B, 1]` (a pure-decode step) -> logits `[B, V]` (fp32)."""
        with self._sdpa_choice():
            h = self.model.hidden_states(tokens, positions, cache.decoding)
        return scale_logits(self.model.output(h[:, 0]), self.model.config).float()


class ModelRunner:
    """Forward + sampling for the engine over one `PagedKVCache`.

    Two model calls (both compiled with `compile`): a pure-decode step (every chunk one token) runs
    as a batch `[B, 1]` padded to a bucket of `buckets` (`compile_decode`: static shapes, the same
    backend `Generator`'s decode uses, one graph per bucket); any other step runs flattened (`[1, T]`,
    `compile_prefill`: one graph for every size; compiled, its groups are padded so that no size is
    ever 0 or 1, which Dynamo would specialize on). With `store` each graph persists across
    processes (`generation.compile_cache`)."""

    def __init__(self, model: nn.Module, cache: PagedKVCache, backends: list, compile: bool = False,
                 buckets: Sequence[int] = (), store: CompileCache | None = None, compile_backend: str | None = None):
        self.model, self.cache, self.backends = model, cache, backends
        self.block_size = cache.block_size
        self.device = next(model.parameters()).device
        self.compiled = compile
        self._mask_pool: ThreadPoolExecutor | None = None  # fills grammar masks while the forward runs
        self.buckets = tuple(sorted(buckets))
        self.padded = compile or bool(self.buckets)  # the padded layouts (eager too when buckets are given)
        self.store = store
        steps = EngineSteps(model, backends, auto=set(backends) == set(SDPA_BACKENDS.values()))
        self._forward, self._decode_step = steps.step, steps.decode
        if compile and compile_backend is not None:  # another torch.compile backend (tests: Dynamo's graphs alone)
            self._forward = LoggedCompile(steps.step, "engine step", static_tokens=False, fullgraph=True,
                                          backend=compile_backend)
            self._decode_step = LoggedCompile(steps.decode, DECODE_STEP, fullgraph=True, dynamic=False,
                                              backend=compile_backend)
        elif compile:  # saved whole: a warm start loads each step without tracing (fmstack.backends.precompile)
            self._forward = compile_prefill(steps.step, "engine step", store, precompile=True,
                                            frozen_attribute="model")
            self._decode_step = compile_decode(steps.decode, self.device, frozen_attribute="model",
                                               what=DECODE_STEP, store=store, precompile=True)
        if compile:
            raise_recompile_limit()  # one graph per bucket: more than Dynamo's default limit of 8 with many

    @torch.inference_mode()  # as the step's arguments are made when it runs (the saved guards check it)
    def is_stored(self, bucket: int) -> bool:
        """Whether the compile cache holds the decode graph of `bucket` (a warm start loads it)."""
        if not isinstance(self._decode_step, LoggedCompile):
            return False
        return self._decode_step.stored(*self._decode_args(bucket))

    @torch.inference_mode()
    def warm_up(self, buckets: Sequence[int]) -> None:
        """Run the decode step once per bucket in `buckets` and the flattened step once, on padding
        rows only (their K/V go to the null block), so that each graph is compiled (or loaded from the
        store) now. The flattened step's sizes are all distinct and >= 2: Dynamo gives each its own
        symbol, so no later size combination recompiles it. Cold, the graphs go two at a time: the
        second compiles in a background process while this one compiles the first
        (`LoggedCompile.prebuild`), so both cores work."""
        calls = [(f"decode batch {b}", self._decode_step, functools.partial(self._decode_args, b)) for b in buckets]
        calls.append(("prefill step", self._forward, lambda: self._step_args(self.inputs(padding_chunks(self.block_size)))))
        for i in range(0, len(calls), 2):
            pair = calls[i:i + 2]
            if len(pair) == 2 and isinstance(pair[1][1], LoggedCompile):
                pair[1][1].prebuild(*pair[1][2]())
            for j, (what, step, args) in enumerate(pair):
                log.info("engine warm-up %d/%d: %s", i + j + 1, len(calls), what)
                step(*args())

    def _decode_args(self, bucket: int) -> tuple:
        """A decode step's arguments for `bucket` padding rows (the key slots set on the cache)."""
        self._set_decode(build_decode([], self.block_size, bucket, self.device))
        tokens, positions = (torch.zeros(bucket, 1, dtype=torch.long, device=self.device) for _ in range(2))
        return tokens, positions, self.cache  # tokens and positions not aliased: Dynamo guards on it

    def bucket(self, batch: int) -> int:
        """The decode batch `batch` sequences run as (itself without buckets or past the largest one)."""
        return next((b for b in self.buckets if b >= batch), batch)

    def decode_logits(self, chunks: Sequence[ScheduledChunk]) -> Tensor:
        """A pure-decode step (every chunk one token) -> logits `[len(chunks), V]`, row i of chunk i."""
        B = len(chunks)
        Bp = self.bucket(B)
        pad = Bp - B
        dev = self.device
        tokens = torch.tensor([c.token_ids[0] for c in chunks] + [0] * pad, dtype=torch.long, device=dev)[:, None]
        positions = torch.tensor([c.start for c in chunks] + [0] * pad, dtype=torch.long, device=dev)[:, None]
        self._set_decode(build_decode([(c.start, c.block_table) for c in chunks], self.block_size, Bp, dev))
        return self._decode_step(tokens, positions, self.cache)[:B]

    def _set_decode(self, kv_slots: Tensor) -> None:
        """The decode step's key slots into the cache's layer views (outside the compiled step)."""
        if self.compiled:
            maybe_mark_dynamic(kv_slots, 1)  # the key length: one graph per bucket, not per length
        self.cache.set_decode(kv_slots)

    def inputs(self, chunks: Sequence[ScheduledChunk]) -> StepInputs:
        """Host-side step inputs: flat tokens/positions, slot mapping, groups, logit rows wanted.
        Compiled, the decode and prefill groups are always both there, each of >= 2 sequences (padding
        sequences of one token at position 0 that attend to the null block), and >= 2 logit rows."""
        bs = self.block_size
        toks, pos, slots, logit_rows, first_row = [], [], [], [], []
        decode, prefill = [], []
        off = 0
        for c in chunks:
            toks.extend(c.token_ids)
            pos.extend(range(c.start, c.start + c.n))
            slots.extend(c.block_table[p // bs] * bs + p % bs for p in range(c.start, c.start + c.n))
            (decode if c.n == 1 else prefill).append((off, c.start, c.n, c.block_table))
            first_row.append(len(logit_rows))
            if c.all_logits or c.draft:  # speculative chunks: every position is verified
                logit_rows.extend(range(off, off + c.n))
            elif c.sample:
                logit_rows.append(off + c.n - 1)
            off += c.n
        if self.padded:
            for group in (decode, prefill):
                group.extend([(0, 0, 1, ())] * max(0, 2 - len(group)))
            logit_rows.extend([0] * max(0, 2 - len(logit_rows)))
        groups, out_index, base = [], [0] * off, 0
        for group_chunks in (decode, prefill):
            if not group_chunks:
                continue
            g = build_group(group_chunks, bs, self.device)
            Q = g.q_index.shape[1]
            for s, (o, _, n, table) in enumerate(group_chunks):
                if table:  # padding sequences have no table and no tokens of their own
                    out_index[o:o + n] = range(base + s * Q, base + s * Q + n)
            base += len(group_chunks) * Q
            groups.append(g)
        t = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return StepInputs(t(toks)[None], t(pos)[None], StepMeta(t(slots), t(out_index), tuple(groups)),
                          t(logit_rows), first_row)

    def _step_args(self, x: StepInputs) -> tuple:
        """A flattened step's arguments (its paged-attention inputs set on the cache; compiled, every
        size marked dynamic)."""
        if self.compiled:
            x.meta.mark_dynamic()
            for t, dim in ((x.tokens, 1), (x.positions, 1), (x.logit_index, 0)):
                maybe_mark_dynamic(t, dim)
        self.cache.set_step(x.meta)
        return x.tokens, x.positions, self.cache, x.logit_index

    def _logits(self, x: StepInputs) -> Tensor:
        return self._forward(*self._step_args(x))

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        """Run the step; every value in the result is on the host."""
        out = RunnerOutput()
        masks = self._start_masks(scheduled.chunks)
        if all(c.n == 1 for c in scheduled.chunks):  # pure decode: one row of logits per chunk
            logits = self.decode_logits(scheduled.chunks)
            first_rows = range(len(scheduled.chunks))
        else:
            x = self.inputs(scheduled.chunks)
            logits = self._logits(x)  # no rows (eager) when only mid-prompt chunks ran: their K/V is all they leave
            first_rows = x.first_row
        to_sample = []
        for c, first in zip(scheduled.chunks, first_rows):
            if c.all_logits:
                out.prompt_logprobs[c.seq.id] = self._prompt_logprobs(c, logits[first:first + c.n])
            if c.draft:
                toks = verify_drafts(logits[first:first + c.n], list(c.draft), c.seq.params.sampling, c.seq.generator)
                out.accepted[c.seq.id], out.sampled[c.seq.id] = toks[:-1], toks[-1]
            elif c.sample:
                to_sample.append((c, first + c.n - 1 if c.all_logits else first))
        if to_sample:
            self._sample(to_sample, logits, out, masks)
        return out

    def _start_masks(self, chunks: list[ScheduledChunk]) -> Future | None:
        """Grammar masks of the rows to sample, filled on a thread while the forward runs (they depend
        only on the tokens accepted before this step; see `structured`). Rows in `_sample`'s order."""
        matchers = [c.seq.matcher for c in chunks if c.sample and not c.draft]
        if all(m is None for m in matchers):
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="fmstack-masks")
        return self._mask_pool.submit(fill_masks, matchers)

    def _prompt_logprobs(self, c: ScheduledChunk, rows: Tensor) -> list[TokenLogprob | None]:
        """rows `[n, V]`: logits at positions start..start+n-1; position p predicts prompt token p+1."""
        seq, k = c.seq, c.seq.params.prompt_logprobs
        entries: list[TokenLogprob | None] = [None] * c.n
        valid = [j for j in range(c.n) if c.start + j + 1 < seq.prompt_len]
        if not valid:
            return entries
        targets = [seq.tokens[c.start + j + 1] for j in valid]  # prompt tokens: never change
        lp = rows[torch.tensor(valid, device=rows.device)].log_softmax(-1)
        chosen = lp.gather(-1, torch.tensor(targets, device=rows.device)[:, None])[:, 0].tolist()
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (None, None)
        for r, j in enumerate(valid):
            top = list(zip(top_i[r].tolist(), top_v[r].tolist())) if k > 0 else []
            entries[j] = TokenLogprob(targets[r], chosen[r], top)
        return entries

    def _sample(self, to_sample: list[tuple[ScheduledChunk, int]], logits: Tensor, out: RunnerOutput,
                masks: Future | None = None) -> None:
        rows = logits[torch.tensor([r for _, r in to_sample], device=logits.device)]  # [B, V]
        seqs = [c.seq for c, _ in to_sample]
        params = [s.params.sampling for s in seqs]
        apply_masks(rows, [s.matcher for s in seqs], masks)  # constrained rows only: disallowed tokens to -inf
        adjustments = logit_adjustments(params, [s.tokens for s in seqs], [s.prompt_len for s in seqs],
                                        [s.stops.stop_ids if s.stops is not None else () for s in seqs],
                                        rows.shape[-1], rows.device)
        ids = sample_rows(rows, params, [s.generator for s in seqs], adjustments).tolist()
        lps = rows.log_softmax(-1) if any(s.params.logprobs is not None for s in seqs) else None
        for i, (seq, tok) in enumerate(zip(seqs, ids)):
            out.sampled[seq.id] = tok
            k = seq.params.logprobs
            if k is None:
                continue
            top = []
            if k > 0:
                v, ix = lps[i].topk(k)
                top = list(zip(ix.tolist(), v.tolist()))
            out.logprobs[seq.id] = TokenLogprob(tok, lps[i, tok].item(), top)
