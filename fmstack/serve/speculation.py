"""Speculative decoding in the serving engine: prompt-lookup (n-gram) proposals, verified by the
target model inside the engine's own step.

Why: at small batch a decode step reads every weight to produce one token per sequence; scoring
k + 1 positions of one sequence costs little more than one, so every accepted proposal is a token
for (almost) free. Prompt lookup (Saxena 2023, "Prompt Lookup Decoding"; vLLM's `ngram` method)
needs no draft model: the last n tokens of a sequence are looked up earlier in its own prompt and
output, and the k tokens that followed there are proposed. It pays where outputs repeat their
input (editing code, quoting, lists, summaries) and costs a wider step where they do not. At
larger batches the step is no longer bound by reading the weights, and k + 1 positions per
sequence cost up to k + 1 times as much: above `max_batch` running sequences nothing is proposed.
Measured on the default model with `python -m benchmarks.serve_speculation` (results in
benchmarks/results/serve_speculation_cpu.json; see docs/serve.md).

How a step goes:
- before scheduling, `NgramProposer.propose` sets `seq.draft` of each eligible running sequence
  in decode state (nothing when more than `max_batch` are running);
- the scheduler runs [last token] + draft as one chunk (the paged step's prefill group), with blocks
  for all of it, budget and blocks permitting (else the plain decode token);
- the runner takes the logits at all k + 1 positions to `verify_drafts`: speculative sampling's
  acceptance rule (`generation.speculative.accept_proposals`, the one implementation) with the draft
  distribution one-hot on each proposal. The committed tokens are distributed as the target's; at
  temperature 0 they are exactly the target's greedy tokens;
- the scheduler commits the accepted proposals and rolls the rejected ones back (`num_computed`,
  freed blocks); the engine feeds every new token through the request's stop checker in order.

Eligible requests: no grammar (the mask of each proposed position would need the matcher advanced
along the draft), no logprobs, no penalties/logit_bias/min_tokens (they depend on the tokens before
each position), no seed (a seeded request's output must not depend on the server's load, which
switches speculation on and off).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fmstack.errors import ParameterError
from fmstack.generation.sampling import (SamplingParams, draw, exponential_noise, filtered_probs, min_p_tensor,
                                         sampling_tensors)
from fmstack.generation.speculative import MAX_SPECULATE_K, accept_proposals
from fmstack.serve.request import Sequence

DEFAULT_K = 4
# Running sequences above which nothing is proposed. Measured on the 2-core CPU (docs/serve.md): the
# speed-up fell from 2.45x alone to 1.15x at 4 but was still 1.35x at 16 and 1.65x at 32 requests, so
# the default is the engine's default seat count (32); measure again where a step is cheaper per row.
DEFAULT_MAX_BATCH = 32
MAX_NGRAM = 3  # longest suffix looked up; shorter ones are tried when it is not found


@dataclass(frozen=True)
class SpeculationConfig:
    """method "ngram"; k proposals per step; off when more than max_batch sequences run."""

    method: str = "ngram"
    k: int = DEFAULT_K
    max_batch: int = DEFAULT_MAX_BATCH
    max_ngram: int = MAX_NGRAM
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ParameterError(f"speculative method {self.method!r} is unknown: the engine supports 'ngram'")
        for name, low, high in (("k", 1, MAX_SPECULATE_K), ("max_batch", 1, None), ("min_ngram", 1, None),
                                ("max_ngram", self.min_ngram, None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
                allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ParameterError(f"speculative {name}={v!r} is invalid: must be an integer {allowed}")


def parse_speculative(spec: str | None, max_batch: int = DEFAULT_MAX_BATCH) -> SpeculationConfig | None:
    """`--speculative` value: None / "off" -> None; "ngram" or "ngram:K" -> a SpeculationConfig."""
    if spec is None or spec == "off":
        return None
    method, _, k = spec.partition(":")
    if method != "ngram" or (k and not k.isdigit()):
        raise ParameterError(f"--speculative {spec!r} is invalid: 'ngram' or 'ngram:K' (K proposals per step, "
                             f"1..{MAX_SPECULATE_K}), or 'off'")
    return SpeculationConfig(method, int(k) if k else DEFAULT_K, max_batch)


def ngram_lookup(tokens: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (max_n down to min_n tokens long) that occurs earlier; [] when none does."""
    L = len(tokens)
    if L < 2 or k < 1:
        return []
    t = torch.tensor(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        windows = t[:L - 1].unfold(0, n, 1)  # windows that have a next token
        hits = (windows == t[L - n:]).all(dim=1).nonzero()
        if len(hits):
            i = int(hits[-1]) + n
            return tokens[i:i + k]
    return []


def eligible(seq: Sequence) -> bool:
    """Whether `seq` may speculate at all (see the module docstring)."""
    p, sp = seq.params, seq.params.sampling
    return seq.matcher is None and p.logprobs is None and not sp.adjusts_logits and sp.seed is None


class NgramProposer:
    """Sets each running sequence's `draft` before a step; counts proposals and acceptances."""

    def __init__(self, config: SpeculationConfig):
        self.config = config
        self.proposed = self.accepted = self.steps_on = self.steps_off = 0

    def propose(self, running: list[Sequence]) -> None:
        cfg = self.config
        on = len(running) <= cfg.max_batch
        self.steps_on, self.steps_off = self.steps_on + on, self.steps_off + (not on)
        for seq in running:
            seq.draft = []
            if not on or seq.num_tokens - seq.num_computed != 1 or not eligible(seq):
                continue
            k = min(cfg.k, seq.params.sampling.max_new_tokens - seq.generated - 1)
            if k > 0:
                seq.draft = ngram_lookup(seq.tokens, k, cfg.max_ngram, cfg.min_ngram)

    def record(self, drafts: Iterable[tuple[int, int]]) -> None:
        """(proposed, accepted) per verified chunk of a step."""
        for n, a in drafts:
            self.proposed += n
            self.accepted += a

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def verify_drafts(rows: Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator | None) -> list[int]:
    """rows `[k + 1, V]`: the target's logits at the last committed token and at each proposal ->
    the accepted proposals followed by one token from the target (the correction or the bonus)."""
    dev, vocab = rows.device, rows.shape[-1]
    n = rows.shape[0]
    if params.greedy:
        p = torch.nn.functional.one_hot(rows.argmax(-1), vocab).float()
        return accept_proposals(draft, p, None, generator, lambda q: int(q.argmax()))
    temperature, top_k, top_p = sampling_tensors([params], dev)
    min_p = min_p_tensor([params], dev)
    p = filtered_probs(rows, temperature.expand(n), top_k.expand(n), top_p.expand(n),
                       None if min_p is None else min_p.expand(n))
    return accept_proposals(draft, p, None, generator,
                            lambda q: int(draw(q[None], exponential_noise((1, vocab), [generator], dev))[0]))
