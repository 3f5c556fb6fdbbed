"""Log-likelihood scoring of `(context_ids, continuation_ids)` requests: the one path shared by
HellaSwag, perplexity and the lm-eval adapter.

Requests with the same context are packed into one group: the context once, then each
continuation (without its last token, which predicts nothing), with RoPE positions restarting right
after the context for every continuation. A block mask (`PackedMask`) lets a continuation see the
context and its own earlier tokens only, so each score equals that of the plain sequence
`context + continuation`, while the context is run once. A sliding window (Mistral) is applied on
those RoPE positions inside the mask, so it counts tokens of the plain sequence, not of the packed
row. Groups are sorted by length and batched,
longest first; the room a row leaves short of the batch's longest group takes the longest groups
left that fit (several groups per row, each seeing only itself), so less of a forward is padding:
8% instead of 12% of the tokens run on the first 100 HellaSwag dev rows (0.5% against 0.6% on all
2,009). The mask is folded for grouped-query heads and made additive once per forward, not in every
layer. Only hidden states at positions that predict a continuation token go through the LM head,
in chunks, so no `[B, T, V]` logits tensor is ever built; each chunk's log-sum-exp and greedy check
share one max pass; the head's logits are scaled as the model's own forward scales them (Granite's
`logits_scaling`). Together: 7% less CPU time than one group per row with a boolean mask on those
100 rows (26.7 s against 28.7 s at 1 thread, best of 3, same log-likelihoods within 3e-5).
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fmstack.errors import ParameterError
from fmstack.models.llama import causal_window_mask, fold_gqa, fold_gqa_mask, scale_logits, sdpa, unfold_gqa

log = logging.getLogger(__name__)

LOGIT_CHUNK_ELEMS = 1 << 25  # logits per LM-head chunk (128 MiB in fp32)


@dataclass
class Score:
    logprob: float  # sum of log p(continuation token | everything before), natural log
    greedy: bool  # every continuation token is the argmax of its prediction
    n_tokens: int


@dataclass
class ScoreStats:
    requests: int = 0
    forward_tokens: int = 0  # tokens run through the model, padding excluded
    padded_tokens: int = 0  # batch x length of every forward, padding included
    scored_tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0


class PackedMask:
    """Attention "cache" for packed sequences: `mask [B, 1, T, T]` (True = may attend); stores nothing.

    Given the model's head counts and dtype, the mask is folded for grouped-query heads (as `sdpa`
    does) and made additive once, here, instead of in each of the model's layers."""

    def __init__(self, mask: Tensor, n_heads: int | None = None, n_kv_heads: int | None = None,
                 dtype: torch.dtype | None = None):
        self.mask = mask
        self._heads = (n_heads, n_kv_heads, dtype)
        self._additive = None
        if n_heads is not None and n_kv_heads is not None and dtype is not None:
            folded = fold_gqa_mask(mask, n_heads, n_kv_heads) if n_heads != n_kv_heads else mask
            self._additive = torch.zeros(folded.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~folded, float("-inf"))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        H, Hkv = q.shape[1], k.shape[1]
        if self._additive is None or self._heads != (H, Hkv, q.dtype):
            return sdpa(q, k, v, mask=self.mask)
        if H == Hkv:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._additive)
        return unfold_gqa(F.scaled_dot_product_attention(fold_gqa(q, Hkv), k, v, attn_mask=self._additive), H)


def packed_mask(segments: Tensor, groups: Tensor | None = None, positions: Tensor | None = None,
                window: int | None = None) -> Tensor:
    """segments `[B, T]` (0 context, j >= 1 continuation j, -1 padding) -> mask `[B, 1, T, T]`;
    `groups [B, T]` (optional) tells apart the groups sharing a row: a token sees its own group only.
    With a sliding `window`, a query also sees only keys whose RoPE `positions [B, T]` are within the
    window of its own (a query always sees itself, so still no row is fully masked).

    Query i sees key k <= i when k is context or in i's own segment; padding sees earlier padding
    (and, without `groups`, the context), so no row is fully masked (an all-masked row would give NaN)."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device)
    causal = idx[:, None] >= idx[None, :]
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    mask = causal & ((seg_q == seg_k) | (seg_k == 0))
    if groups is not None:
        mask &= groups[:, :, None] == groups[:, None, :]
    if window is not None:
        mask &= causal_window_mask(positions[:, None, :], positions[:, :, None], window)
    return mask[:, None]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal-LM split: trailing spaces of the context move to the continuation, the two
    are tokenized together, and the continuation is what follows the context's own token count.
    An empty context becomes the prefix token (BOS, else EOS)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return [prefix], tokenizer.encode(continuation, add_bos=False)
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    return whole[:n_ctx], whole[n_ctx:]


@dataclass
class _Group:
    context: tuple[int, ...]
    members: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (request index, continuation)

    @property
    def length(self) -> int:  # packed length: context + every continuation but its last token
        return len(self.context) + sum(len(c) - 1 for _, c in self.members)


class Scorer:
    """Scores requests with `model` (a `Transformer`). `batch_size`: packed sequences (one context and
    all its continuations) per forward; `max_batch_tokens` caps batch x padded length as well
    (default 2048 on CPU, where small length-sorted batches waste less on padding; 32768 on CUDA).
    `compile` wraps `model.hidden_states` in `torch.compile(dynamic=True)`."""

    def __init__(self, model, batch_size: int = 32, max_length: int | None = None,
                 max_batch_tokens: int | None = None, compile: bool = False, progress: bool = False):
        if batch_size <= 0:
            raise ParameterError(f"batch_size={batch_size} is invalid: must be >= 1")
        self.device = next(model.parameters()).device
        self.model, self.batch_size = model, batch_size
        self.max_batch_tokens = max_batch_tokens or (32768 if self.device.type == "cuda" else 2048)
        self.max_length = max_length or model.config.max_seq_len
        if self.max_length < 2:
            raise ParameterError(f"max_length={self.max_length} is invalid: must be >= 2")
        self.progress = progress
        self.stats = ScoreStats()
        self._hidden = model.hidden_states
        if compile:
            self._hidden = torch.compile(model.hidden_states, dynamic=True)

    @torch.inference_mode()
    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Score]:
        """One `Score` per `(context_ids, continuation_ids)` request, in request order. A context may be
        cut from the left so that context + continuation fits `max_length + 1` tokens."""
        t0 = time.perf_counter()
        results: list[Score | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], _Group] = {}
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = tuple(ctx), tuple(cont)
            if not cont:
                results[i] = Score(0.0, True, 0)
                continue
            if not ctx:
                raise ParameterError(f"request {i} has an empty context: give at least a prefix (BOS) token")
            if len(cont) > self.max_length:
                raise ParameterError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length "
                                     f"{self.max_length}")
            ctx = ctx[max(0, len(ctx) + len(cont) - 1 - self.max_length):]
            groups.setdefault(ctx, _Group(ctx)).members.append((i, cont))
        order = sorted(groups.values(), key=lambda g: -g.length)  # longest first: memory trouble shows early
        from tqdm import tqdm

        bar = tqdm(total=len(requests), disable=not self.progress, desc="scoring", unit="req", leave=False)
        for rows in self._batches(order):
            batch = [g for row in rows for g in row]
            for (i, _), score in zip((m for g in batch for m in g.members), self._score_batch(rows)):
                results[i] = score
            bar.update(sum(len(g.members) for g in batch))
        bar.close()
        self.stats.requests += len(requests)
        self.stats.seconds += time.perf_counter() - t0
        return results  # type: ignore[return-value]

    def _batches(self, order: list[_Group]):
        """Rows of groups, one batch at a time, from `order` (longest first). A batch's length T is its
        longest group's; each row starts with the longest group left, and the room it leaves short of
        T takes the longest group left that fits, again and again (best fit, largest first). A row
        starting with a group of one request stays alone: such rows run without a mask."""
        pool = order[::-1]  # shortest first; taken from the end
        lengths = [g.length for g in pool]
        while pool:
            T = lengths[-1]
            n = max(1, min(self.batch_size, self.max_batch_tokens // max(T, 1)))
            rows = []
            while pool and len(rows) < n:
                row, room = [pool.pop()], T - lengths.pop()
                while len(row[0].members) > 1 and (j := bisect.bisect_right(lengths, room) - 1) >= 0:
                    room -= lengths.pop(j)
                    row.append(pool.pop(j))
                rows.append(row)
            yield rows

    def _layout(self, rows: list[list[_Group]]):
        """Token, position, segment and group tensors `[B, T]` of a batch of rows, and the LM-head
        plan: predicting (row, column) pairs, their target ids and the member each belongs to."""
        B, T = len(rows), max(sum(g.length for g in row) for row in rows)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        segments = torch.full((B, T), -1, dtype=torch.long)
        groups = torch.full((B, T), -1, dtype=torch.long)
        plan = ([], [], [], [])  # rows, cols, targets, owners
        m = 0
        for b, row in enumerate(rows):
            at = 0
            for gi, g in enumerate(row):
                m = self._place(g, b, at, m, tokens, positions, segments, plan)
                groups[b, at:at + g.length] = gi
                at += g.length
            positions[b, at:] = torch.arange(T - at)  # padding: harmless positions
        return tokens, positions, segments, groups, plan, m

    @staticmethod
    def _place(g: _Group, b: int, at: int, m: int, tokens, positions, segments, plan) -> int:
        """Writes group `g` into row `b` from column `at`; returns the next member index."""
        rows, cols, targets, owners = plan
        L = len(g.context)
        tokens[b, at:at + L] = torch.tensor(g.context)
        positions[b, at:at + L] = torch.arange(L)
        segments[b, at:at + L] = 0
        c = at + L
        for j, (_, cont) in enumerate(g.members):
            n = len(cont) - 1
            tokens[b, c:c + n] = torch.tensor(cont[:-1], dtype=torch.long)
            positions[b, c:c + n] = torch.arange(L, L + n)
            segments[b, c:c + n] = j + 1
            rows += [b] * (n + 1)
            cols += [at + L - 1, *range(c, c + n)]
            targets += cont
            owners += [m] * (n + 1)
            c += n
            m += 1
        return m

    def _score_batch(self, rows: list[list[_Group]]) -> list[Score]:
        """Scores of every member of every group, row by row and group by group."""
        tokens, positions, segments, groups, (rws, cols, targets, owners), m = self._layout(rows)
        B, T = tokens.shape
        dev, cfg = self.device, self.model.config
        # right-padded causal rows of one request each need no mask
        single = all(len(row) == 1 and len(row[0].members) == 1 for row in rows)
        several = any(len(row) > 1 for row in rows)
        mask = packed_mask(segments.to(dev), groups.to(dev) if several else None, positions.to(dev),
                           cfg.sliding_window)  # single rows: the model applies the window itself
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        cache = None if single else PackedMask(mask, cfg.n_heads, cfg.n_kv_heads, dtype)  # dtype: activations'
        h = self._hidden(tokens.to(dev), positions.to(dev), cache)  # [B, T, dim]
        sel = h[torch.tensor(rws, device=dev), torch.tensor(cols, device=dev)]  # [N, dim]
        logp, hit = self._head(sel, torch.tensor(targets, device=dev))
        own = torch.tensor(owners, device=dev)
        sums = torch.zeros(m, dtype=torch.float64, device=dev).index_add_(0, own, logp.double())
        misses = torch.zeros(m, dtype=torch.long, device=dev).index_add_(0, own, (~hit).long())
        counts = torch.bincount(own, minlength=m)
        st = self.stats
        st.forwards += 1
        st.forward_tokens += sum(g.length for row in rows for g in row)
        st.padded_tokens += B * T
        st.scored_tokens += len(targets)
        return [Score(s, x == 0, c) for s, x, c in zip(sums.tolist(), misses.tolist(), counts.tolist())]

    def _head(self, sel: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        """log p(target) and whether the target is the argmax, for hidden states `sel [N, dim]`, through
        the LM head in chunks. One max pass gives both the log-sum-exp's shift and the argmax (the
        first maximal index, as argmax); exp and sum then run in place on the chunk."""
        logp = torch.empty(len(tgt), dtype=torch.float32, device=sel.device)
        hit = torch.empty(len(tgt), dtype=torch.bool, device=sel.device)
        step = max(1, LOGIT_CHUNK_ELEMS // self.model.config.vocab_size)
        for s in range(0, len(tgt), step):
            logits = scale_logits(self.model.output(sel[s:s + step]), self.model.config).float()  # [n, V]
            t = tgt[s:s + step, None]
            top, arg = logits.max(-1, keepdim=True)
            picked = logits.gather(-1, t)
            lse = logits.sub_(top).exp_().sum(-1, keepdim=True).log_().add_(top)
            logp[s:s + step] = (picked - lse)[:, 0]
            hit[s:s + step] = arg[:, 0] == t[:, 0]
        return logp, hit
