"""Runs one engine step on the model: host-built inputs from a `SchedulerOutput` -> one forward over
all scheduled tokens (prefill chunks and decode tokens flattened into one row, see `paged_cache`),
logits only where they are needed -> prompt logprobs and sampling -> a `RunnerOutput`.

Nothing produced by one (possibly compiled) forward is fed to the next: every step's inputs are
built from host lists, and the output holds host values only (`.tolist()`), so a CUDA-graph replay
that reuses its output buffers cannot change a result already handed out. The runner keeps no
per-request state; seeded requests bring their own `torch.Generator` on the sequence.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import sdpa_kernel

from fmstack.backends import maybe_mark_dynamic
from fmstack.generation.sampling import logit_adjustments, sample_rows
from fmstack.generation.structured import apply_masks, fill_masks
from fmstack.serve.paged_cache import AttnGroup, PagedKVCache, StepMeta, build_group
from fmstack.serve.request import RunnerOutput, ScheduledChunk, SchedulerOutput, TokenLogprob
from fmstack.serve.speculation import verify_drafts


@dataclass
class StepInputs:
    """tokens/positions `[1, T]`, the paged-attention metadata, logit_index `[N]` (flat rows whose
    logits are computed) and first_row: each chunk's first row in the logits `[N, V]`."""

    tokens: Tensor
    positions: Tensor
    meta: StepMeta
    logit_index: Tensor
    first_row: list[int]


class ModelRunner:
    """Forward + sampling for the engine over one `PagedKVCache`."""

    def __init__(self, model: nn.Module, cache: PagedKVCache, backends: list, compile: bool = False):
        self.model, self.cache, self.backends = model, cache, backends
        self.block_size = cache.block_size
        self.device = next(model.parameters()).device
        self.compiled = compile
        self._mask_pool: ThreadPoolExecutor | None = None  # fills grammar masks while the forward runs
        self._forward = torch.compile(self._forward_impl, fullgraph=True) if compile else self._forward_impl

    def _forward_impl(self, tokens: Tensor, positions: Tensor, cache: PagedKVCache, slot_mapping: Tensor,
                      out_index: Tensor, groups: list[tuple[Tensor, Tensor, Tensor]], logit_index: Tensor) -> Tensor:
        """tokens/positions `[1, T]` -> logits `[N, V]` (fp32) at the flat indices `logit_index [N]`."""
        meta = StepMeta(slot_mapping, out_index, tuple(AttnGroup(*g) for g in groups))
        with sdpa_kernel(self.backends):
            h = self.model.hidden_states(tokens, positions, cache.view(meta))
        return self.model.output(h[0, logit_index]).float()

    def inputs(self, chunks: list[ScheduledChunk]) -> StepInputs:
        """Host-side step inputs: flat tokens/positions, slot mapping, groups, logit rows wanted."""
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
        groups, out_index, base = [], [0] * off, 0
        for group_chunks in (decode, prefill):
            if not group_chunks:
                continue
            g = build_group(group_chunks, bs, self.device)
            Q = g.q_index.shape[1]
            for s, (o, _, n, _) in enumerate(group_chunks):
                out_index[o:o + n] = range(base + s * Q, base + s * Q + n)
            base += len(group_chunks) * Q
            groups.append(g)
        t = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return StepInputs(t(toks)[None], t(pos)[None], StepMeta(t(slots), t(out_index), tuple(groups)),
                          t(logit_rows), first_row)

    def _logits(self, x: StepInputs) -> Tensor:
        if self.compiled:
            x.meta.mark_dynamic()
            for t, dim in ((x.tokens, 1), (x.positions, 1), (x.logit_index, 0)):
                maybe_mark_dynamic(t, dim)
        m = x.meta
        groups = [(g.q_index, g.q_pos, g.kv_slots) for g in m.groups]
        return self._forward(x.tokens, x.positions, self.cache, m.slot_mapping, m.out_index, groups, x.logit_index)

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        """Run the step; every value in the result is on the host."""
        x = self.inputs(scheduled.chunks)
        out = RunnerOutput()
        masks = self._start_masks(scheduled.chunks)
        logits = self._logits(x)  # [0, V] when only mid-prompt chunks ran: their K/V is all they leave
        to_sample = []
        for c, first in zip(scheduled.chunks, x.first_row):
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
