"""Log-likelihood scoring of `(context_ids, continuation_ids)` requests: the one path shared by
HellaSwag, perplexity and the lm-eval adapter.

Requests with the same context are packed into one sequence: the context once, then each
continuation (without its last token, which predicts nothing), with RoPE positions restarting right
after the context for every continuation. A block mask (`PackedMask`) lets a continuation see the
context and its own earlier tokens only, so each score equals that of the plain sequence
`context + continuation`, while the context is run once. A sliding window (Mistral) is applied on
those RoPE positions inside the mask, so it counts tokens of the plain sequence, not of the packed
row. Packed sequences are sorted by length and batched with right padding. Only hidden states at
positions that predict a continuation token go through the LM head, in chunks, so no `[B, T, V]`
logits tensor is ever built; the head's logits are scaled as the model's own forward scales them
(Granite's `logits_scaling`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from fmstack.errors import ParameterError
from fmstack.models.llama import causal_window_mask, scale_logits, sdpa

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
    """Attention "cache" for packed sequences: `mask [B, 1, T, T]` (True = may attend); stores nothing."""

    def __init__(self, mask: Tensor):
        self.mask = mask

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        return sdpa(q, k, v, mask=self.mask)


def packed_mask(segments: Tensor, positions: Tensor | None = None, window: int | None = None) -> Tensor:
    """segments `[B, T]` (0 context, j >= 1 continuation j, -1 padding) -> mask `[B, 1, T, T]`.

    Query i sees key k <= i when k is context or in i's own segment; padding sees the context and
    earlier padding, so no row is fully masked (an all-masked row would give NaN). With a sliding
    `window`, a query also sees only keys whose RoPE `positions` `[B, T]` are within the window of its
    own (a query always sees itself, so still no row is fully masked)."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device)
    causal = idx[:, None] >= idx[None, :]
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    mask = causal & ((seg_q == seg_k) | (seg_k == 0))
    if window is not None:
        mask = mask & causal_window_mask(positions[:, None, :], positions[:, :, None], window)
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
        start = 0
        while start < len(order):
            T = order[start].length
            n = max(1, min(self.batch_size, self.max_batch_tokens // max(T, 1)))
            batch = order[start:start + n]
            start += n
            for (i, _), score in zip((m for g in batch for m in g.members), self._score_batch(batch)):
                results[i] = score
            bar.update(sum(len(g.members) for g in batch))
        bar.close()
        self.stats.requests += len(requests)
        self.stats.seconds += time.perf_counter() - t0
        return results  # type: ignore[return-value]

    def _score_batch(self, batch: list[_Group]) -> list[Score]:
        """Scores of every member of every group, group by group."""
        B, T = len(batch), max(g.length for g in batch)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        segments = torch.full((B, T), -1, dtype=torch.long)
        rows, cols, targets, owners = [], [], [], []  # predicting (row, column), target id, member index
        m = 0
        for b, g in enumerate(batch):
            L = len(g.context)
            tokens[b, :L] = torch.tensor(g.context)
            positions[b, :L] = torch.arange(L)
            segments[b, :L] = 0
            at = L
            for j, (_, cont) in enumerate(g.members):
                n = len(cont) - 1
                tokens[b, at:at + n] = torch.tensor(cont[:-1], dtype=torch.long)
                positions[b, at:at + n] = torch.arange(L, L + n)
                segments[b, at:at + n] = j + 1
                rows += [b] * (n + 1)
                cols += [L - 1, *range(at, at + n)]
                targets += cont
                owners += [m] * (n + 1)
                at += n
                m += 1
            positions[b, at:] = torch.arange(T - at) + L  # padding: harmless positions
        single = all(len(g.members) == 1 for g in batch)  # right-padded causal rows need no mask
        dev = self.device
        window = self.model.config.sliding_window  # single rows: the model applies it itself
        cache = None if single else PackedMask(packed_mask(segments.to(dev), positions.to(dev), window))
        h = self._hidden(tokens.to(dev), positions.to(dev), cache)  # [B, T, dim]
        sel = h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]  # [N, dim]
        tgt = torch.tensor(targets, device=dev)
        logp = torch.empty(len(targets), dtype=torch.float32, device=dev)
        hit = torch.empty(len(targets), dtype=torch.bool, device=dev)
        V = self.model.config.vocab_size
        step = max(1, LOGIT_CHUNK_ELEMS // V)
        for s in range(0, len(targets), step):
            logits = scale_logits(self.model.output(sel[s:s + step]), self.model.config).float()  # [n, V]
            t = tgt[s:s + step, None]
            logp[s:s + step] = (logits.gather(-1, t) - logits.logsumexp(-1, keepdim=True))[:, 0]
            hit[s:s + step] = logits.argmax(-1) == t[:, 0]
        own = torch.tensor(owners, device=dev)
        sums = torch.zeros(m, dtype=torch.float64, device=dev).index_add_(0, own, logp.double())
        misses = torch.zeros(m, dtype=torch.long, device=dev).index_add_(0, own, (~hit).long())
        counts = torch.bincount(own, minlength=m)
        st = self.stats
        st.forwards += 1
        st.forward_tokens += sum(g.length for g in batch)
        st.padded_tokens += B * T
        st.scored_tokens += len(targets)
        return [Score(s, x == 0, c) for s, x, c in zip(sums.tolist(), misses.tolist(), counts.tolist())]
