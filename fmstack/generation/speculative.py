"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023), batch 1.

Each round the draft proposes K tokens one at a time (distributions q_1..q_K); the target scores
the last committed token and all K proposals in one forward (p_1..p_{K+1}). Proposal i is accepted
with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from
normalize(max(0, p_i - q_i)); if all K are accepted a bonus token comes from p_{K+1}. The output is
distributed exactly as sampling from the target alone; with temperature 0 both distributions are
one-hot, so the result is exactly the target's greedy output.

Both models keep static KV caches. Rejected positions are "rewound" by position bookkeeping only:
their stale cache slots lie beyond the next query position, so the causal mask hides them until
they are overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fmstack.errors import ParameterError
from fmstack.generation.compile import with_recompile_limit
from fmstack.generation.generate import GenerationResult, Generator
from fmstack.generation.sampling import SamplingParams, draw, exponential_noise, filtered_probs, sampling_tensors
from fmstack.generation.stopping import StopChecker

MAX_SPECULATE_K = 16
_PROBE_TEXTS = ("Hello, world!", " The year 2024: naïve café 🙂", "<|im_start|>user\nhi<|im_end|>")


@dataclass
class SpeculativeResult(GenerationResult):
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per round (0..K); each round also emits one target token."""
        return self.accepted / self.rounds if self.rounds else 0.0


def check_same_tokenizer(target_tok, draft_tok, target_vocab: int, draft_vocab: int) -> None:
    """Raise ParameterError unless draft and target tokenize identically (vocab size, special ids, probes)."""
    if target_vocab != draft_vocab:
        raise ParameterError(f"--draft-model has vocabulary size {draft_vocab}, the target {target_vocab}: "
                             "draft and target must share a tokenizer")
    if target_tok is None or draft_tok is None:
        return
    for attr in ("bos_id", "eos_id"):
        if getattr(target_tok, attr) != getattr(draft_tok, attr):
            raise ParameterError(f"--draft-model tokenizer differs from the target's ({attr} "
                                 f"{getattr(draft_tok, attr)} vs {getattr(target_tok, attr)})")
    for text in _PROBE_TEXTS:
        if target_tok.encode(text) != draft_tok.encode(text):
            raise ParameterError(f"--draft-model tokenizer differs from the target's (they encode {text!r} "
                                 "differently): draft and target must share a tokenizer")


def accept_proposals(proposals: list[int], p: Tensor, q: list[Tensor] | None, gen: torch.Generator | None,
                     pick: Callable[[Tensor], int]) -> list[int]:
    """Speculative sampling's accept/reject over a draft's proposals (the one implementation: the
    standalone path here and the serving engine's both use it). Proposal d_i (draft distribution
    q_i; q None: every proposal was certain, q_i one-hot on d_i, as a prompt-lookup draft is) is kept
    with probability min(1, p_i[d_i] / q_i[d_i]); the first rejected one is replaced by a draw from
    the residual max(p_i - q_i, 0) and the round ends; if all k are kept, a bonus token is drawn from
    p_k. `p` `[k + 1, V]`: the target's sampling distributions. The committed tokens are distributed
    as the target's."""
    new_tokens = []
    for i, d in enumerate(proposals):
        if q is None:  # one-hot q_i: ratio p_i[d], residual p_i without d (no V-sized one-hot built)
            ratio = float(p[i, d])
        else:
            ratio = (p[i, d] / q[i][d]).item() if q[i][d] > 0 else 0.0
        if torch.rand((), generator=gen, device=p.device).item() < ratio:
            new_tokens.append(d)
            continue
        residual = p[i].clone().index_fill_(0, torch.tensor([d], device=p.device), 0) if q is None \
            else (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        residual = residual / total if total > 0 else p[i]
        new_tokens.append(pick(residual))
        return new_tokens
    new_tokens.append(pick(p[len(proposals)]))  # all k accepted: bonus token from the target
    return new_tokens


class SpeculativeGenerator:
    def __init__(self, target: Generator, draft: Generator, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATE_K:
            raise ParameterError(f"--speculate-k {k!r} is invalid: must be an integer in [1, {MAX_SPECULATE_K}]")
        check_same_tokenizer(target.tokenizer, draft.tokenizer, target.model.config.vocab_size,
                             draft.model.config.vocab_size)
        self.target, self.draft, self.k = target, draft, k
        self.compiled = target.compiled or draft.compiled

    @with_recompile_limit  # compiled: Dynamo's process-wide recompile limit is raised while this runs
    @torch.inference_mode()
    def generate(self, prompt: list[int], params: SamplingParams,
                 on_text: Callable[[int, str], None] | None = None) -> SpeculativeResult:
        tgt, dft, k = self.target, self.draft, self.k
        if not prompt:
            raise ParameterError("prompt is empty: at least one token is needed")
        if params.adjusts_logits or params.min_p > 0:
            raise ParameterError("speculative decoding does not support penalties, logit_bias, min_tokens or "
                                 "min_p: drop them or the draft model")
        res = SpeculativeResult([])
        if params.max_new_tokens == 0:
            return res
        dev = tgt.device
        n = len(prompt)
        length = n + params.max_new_tokens + k + 1  # a final round may write k + 1 slots past the end
        ct, cd = tgt.ensure_cache(1, length), dft.ensure_cache(1, length)
        ct.reset(), cd.reset()
        temperature, top_k, top_p = sampling_tensors([params], dev)
        gen = tgt._generator(params.seed)
        vocab = tgt.model.config.vocab_size
        stops = StopChecker(params, tgt.eos_ids, tgt.tokenizer)

        def probs(logits: Tensor) -> Tensor:  # [T, V] -> the sampling distributions [T, V]
            if params.greedy:  # one-hot on the argmax (what filtered_probs gives, without its sort)
                return torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
            t = logits.shape[0]
            return filtered_probs(logits, temperature.expand(t), top_k.expand(t), top_p.expand(t))

        def pick(p: Tensor) -> int:  # one draw from p [V]
            if params.greedy:
                return int(p.argmax())
            return int(draw(p[None], exponential_noise((1, vocab), [gen], dev))[0])

        def pos(start: int, count: int) -> Tensor:
            return torch.arange(start, start + count, device=dev)[None]

        t0 = time.perf_counter()
        prompt_t = torch.tensor([prompt], device=dev)
        first = pick(probs(tgt.logits(prompt_t, pos(0, n), ct)[0, -1:])[0])
        dft.logits(prompt_t, pos(0, n), cd)
        t_first = time.perf_counter()
        last, last_pos = first, n  # newest committed token and its position (not yet in either cache)
        draft_pending = [first]  # tokens the draft cache still lacks, ending with `last`
        new_tokens = [first]
        while True:
            if self._emit(new_tokens, res, stops, on_text):
                break
            # Draft proposes k tokens.
            proposals, q = [], []
            tokens = draft_pending
            start = last_pos - len(draft_pending) + 1
            for _ in range(k):
                logits = dft.logits(torch.tensor([tokens], device=dev), pos(start, len(tokens)), cd)[0, -1:]
                qi = probs(logits)[0]
                proposals.append(pick(qi))
                q.append(qi)
                start, tokens = start + len(tokens), proposals[-1:]
            # Target scores the last committed token and every proposal in one forward.
            verify = torch.tensor([[last] + proposals], device=dev)
            p = probs(tgt.logits(verify, pos(last_pos, k + 1), ct)[0])
            res.rounds += 1
            res.proposed += k
            new_tokens = accept_proposals(proposals, p, q, gen, pick)
            accepted = len(new_tokens) - 1
            res.accepted += accepted
            # Target cache now holds `last` and the accepted proposals; the draft also lacks d_k when all were accepted.
            draft_pending = new_tokens[-2:] if accepted == k else new_tokens[-1:]
            last, last_pos = new_tokens[-1], last_pos + accepted + 1
        res.prefill_s, res.decode_s = t_first - t0, time.perf_counter() - t_first
        res.finish_reason, res.stop_reason, res.text = stops.finish_reason, stops.stop_reason, stops.text
        return res

    @staticmethod
    def _emit(new_tokens: list[int], res: SpeculativeResult, stops: StopChecker,
              on_text: Callable[[int, str], None] | None) -> bool:
        """Append tokens in order until `stops` finishes the sequence; True when finished."""
        for tok in new_tokens:
            res.token_ids.append(tok)
            delta = stops.add(tok)
            if on_text and delta:
                on_text(0, delta)
            if stops.finished:
                return True
        return False
