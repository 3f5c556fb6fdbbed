"""Sampling parameters (validated) and a batched, host-sync-free sampler.

`sample` takes per-row temperature/top-k/top-p/min-p tensors, so one compiled step serves rows with
different request parameters (`Generator` runs it inside its compiled step; the serving engine calls
it through `sample_rows`). Multinomial draws use the exponential race (argmax p_i / E_i with
E_i ~ Exp(1)), which needs no host synchronisation, unlike `torch.multinomial` on CUDA.

History-dependent changes to the logits (repetition/presence/frequency penalties, logit_bias, and
masking EOS/stop tokens until min_tokens) depend on each row's tokens, which live on the host. They
are folded into two `[B, V]` tensors built from host lists per step (`logit_adjustments`): a
multiplicative `scale` (repetition penalty) and an additive `add` (the rest), applied in one pass
by `adjust_logits` before temperature, so greedy rows see them too. A batch where no row uses them
builds nothing (both are None) and pays nothing; rows that do not use them get 1 and 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch
from torch import Tensor

from fmstack.errors import ParameterError

MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty (OpenAI's range)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; min_p 0 = off; max_new_tokens counts
    generated tokens. Penalties (0, 0 and 1 = off): presence/frequency (OpenAI) subtract
    `presence * (count > 0) + frequency * count` over the generated tokens; repetition (HF/vLLM)
    divides positive logits and multiplies negative ones by `repetition_penalty` for every token of
    prompt + generated. `logit_bias`: (token id, bias) pairs added to the logits (a dict is accepted
    and normalised). `min_tokens`: EOS and stop tokens are masked until that many tokens are
    generated."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str) -> ParameterError:
            return ParameterError(f"{name}={value!r} is invalid: {allowed}", field=name, value=value, allowed=allowed)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 0")
        if not isinstance(self.temperature, (int, float)) or not (0.0 <= self.temperature < float("inf")):
            raise bad("temperature", self.temperature, "must be a finite number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**63:
            raise bad("top_k", self.top_k, "must be an integer in [0, 2**63) (0 disables top-k)")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", self.top_p, "must be in (0, 1] (1 disables nucleus sampling)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise bad("seed", self.seed, "must be an integer in [-2**63, 2**64) or None")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", self.stop, "must be a list of non-empty strings")
        object.__setattr__(self, "stop", stop)
        self._check_logit_processing(bad)

    def _check_logit_processing(self, bad) -> None:
        """Penalties, min_p, min_tokens and logit_bias (normalised to sorted (id, bias) pairs)."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not PENALTY_RANGE[0] <= v <= PENALTY_RANGE[1]:
                raise bad(name, v, "must be a number in [-2, 2] (0 disables it)")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0 (1 disables it)")
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "must be in [0, 1] (0 disables min-p)")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be an integer >= 0")
        pairs = _bias_pairs(self.logit_bias)
        if (pairs is None or len(pairs) > MAX_LOGIT_BIAS or len({t for t, _ in pairs}) != len(pairs)
                or any(t < 0 or not LOGIT_BIAS_RANGE[0] <= b <= LOGIT_BIAS_RANGE[1] for t, b in pairs)):
            raise bad("logit_bias", self.logit_bias, f"must map at most {MAX_LOGIT_BIAS} distinct token ids "
                                                     "(integers >= 0) to biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", tuple(pairs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Presence or frequency penalty on: the row needs its generated-token counts."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def adjusts_logits(self) -> bool:
        """The row needs `logit_adjustments` (penalties, logit_bias or min_tokens)."""
        return self.penalized or self.repetition_penalty != 1.0 or bool(self.logit_bias) or self.min_tokens > 0

    def check_vocab(self, vocab_size: int) -> None:
        """logit_bias ids must be below the vocabulary size (unknown when the params are built)."""
        over = [t for t, _ in self.logit_bias if t >= vocab_size]
        if over:
            raise ParameterError(f"logit_bias has token ids outside [0, {vocab_size}): {over[:5]}", field="logit_bias",
                                 value=over[:5], allowed=f"token ids in [0, {vocab_size})")


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bias_pairs(value: object) -> list[tuple[int, float]] | None:
    """{id: bias} or [(id, bias), ...] (ids may be decimal strings, as JSON keys are) -> sorted
    (int, float) pairs; None when the shape or a type is wrong."""
    items = value.items() if isinstance(value, dict) else value
    if not isinstance(items, (tuple, list, type({}.items()))):
        return None
    pairs = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            return None
        t, b = item
        if isinstance(t, str) and t.isascii() and t.isdigit() and (t == "0" or not t.startswith("0")):
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, int) or not _finite(b):
            return None
        pairs.append((t, float(b)))
    return sorted(pairs)


def sampling_tensors(params: list[SamplingParams], device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row temperature `[B]` (fp32), top_k `[B]` (int64), top_p `[B]` (fp32)."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    return temperature, top_k, top_p


def min_p_tensor(params: list[SamplingParams], device: torch.device | str) -> Tensor | None:
    """Per-row min_p `[B]` (fp32), or None when no row uses min-p (the filter is skipped)."""
    if all(p.min_p == 0.0 for p in params):
        return None
    return torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)


def logit_adjustments(params: Sequence[SamplingParams], tokens: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                      stop_ids: Sequence[Collection[int]], vocab_size: int,
                      device: torch.device | str) -> tuple[Tensor | None, Tensor | None]:
    """Per-row `scale` and `add` `[B, V]` (fp32) for `adjust_logits`, from host lists: row i has
    generated `tokens[i][prompt_lens[i]:]` after its prompt, and `stop_ids[i]` end it (masked to
    -inf while fewer than min_tokens are generated). (None, None) when no row adjusts its logits;
    either one None when no row needs it. Only rows that use a penalty have their tokens counted."""
    if not any(p.adjusts_logits for p in params):
        return None, None
    B = len(params)
    scale = add = None
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        scale = torch.ones(B, vocab_size, device=device)
        for i in rep:
            seen = torch.tensor(sorted(set(tokens[i])), dtype=torch.long, device=device)
            scale[i, seen] = params[i].repetition_penalty
    if any(p.penalized or p.logit_bias or p.min_tokens > 0 for p in params):
        add = torch.zeros(B, vocab_size, device=device)
        pen = [i for i, p in enumerate(params) if p.penalized]
        if pen:
            add[pen] -= _penalties([params[i] for i in pen], [tokens[i][prompt_lens[i]:] for i in pen],
                                   vocab_size, device)
        for i, p in enumerate(params):
            if p.logit_bias:
                ids, bias = zip(*p.logit_bias)
                add[i, list(ids)] += torch.tensor(bias, device=device)
            if len(tokens[i]) - prompt_lens[i] < p.min_tokens and stop_ids[i]:
                add[i, sorted(stop_ids[i])] = float("-inf")
    return scale, add


def _penalties(params: list[SamplingParams], generated: list[Sequence[int]], vocab_size: int,
               device: torch.device | str) -> Tensor:
    """`presence * (count > 0) + frequency * count` `[b, V]` over each row's generated tokens."""
    counts = torch.zeros(len(params), vocab_size, device=device)
    rows = [i for i, g in enumerate(generated) for _ in g]
    if rows:
        ids = torch.tensor([t for g in generated for t in g], dtype=torch.long, device=device)
        counts.index_put_((torch.tensor(rows, device=device), ids), torch.ones(len(rows), device=device),
                          accumulate=True)
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    return presence * (counts > 0) + frequency * counts


def adjust_logits(logits: Tensor, scale: Tensor | None, add: Tensor | None) -> Tensor:
    """logits `[B, V]` -> fp32 logits with the repetition penalty (`scale`: positive logits divided,
    negative multiplied) then `add` applied; unchanged when both are None."""
    if scale is None and add is None:
        return logits
    logits = logits.float()
    if scale is not None:
        logits = torch.where(logits > 0, logits / scale, logits * scale)
    return logits if add is None else logits + add


def filtered_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                   min_p: Tensor | None = None) -> Tensor:
    """The sampling distribution `[B, V]` (fp32): softmax(logits / T) restricted to the tokens whose
    probability is at least min_p times the most likely one's (min_p None: no such filter) and to
    the top-k tokens, then to the smallest prefix of the sorted distribution whose mass reaches
    top_p (at least one token), renormalised. Rows with temperature 0 get a one-hot on the argmax."""
    logits = logits.float()
    scaled = logits / temperature.clamp_min(1e-5)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    drop = ranks[None, :] >= k[:, None]
    if min_p is not None:  # p_i < min_p * p_max  <=>  s_i - s_max < log(min_p) (log 0 = -inf keeps all)
        drop = drop | (sorted_logits - sorted_logits[:, :1] < min_p.log()[:, None])
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = drop | (mass_before >= top_p[:, None])
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    probs = torch.zeros_like(probs).scatter_(-1, order, probs)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype)
    return torch.where((temperature == 0)[:, None], one_hot, probs)


def draw(probs: Tensor, noise: Tensor) -> Tensor:
    """One token per row from `probs [B, V]` with Exp(1) `noise [B, V]`: argmax p_i / E_i (exponential race)."""
    return (probs / noise).argmax(dim=-1)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, noise: Tensor,
           min_p: Tensor | None = None) -> Tensor:
    """logits `[B, V]`, per-row params `[B]`, noise `[B, V]` ~ Exp(1) -> token ids `[B]` (int64).

    Rows with temperature 0 take the argmax. Min-p keeps the tokens at least min_p times as likely
    as the top one; top-k keeps the k highest logits; top-p then keeps the smallest prefix of the
    sorted distribution whose mass reaches p (always at least one token).
    """
    sampled = draw(filtered_probs(logits, temperature, top_k, top_p, min_p), noise)
    return torch.where(temperature == 0, logits.argmax(dim=-1), sampled)


def sample_rows(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                adjustments: tuple[Tensor | None, Tensor | None] = (None, None)) -> Tensor:
    """The host-driven entry point (the serving engine): logits `[B, V]`, one `SamplingParams` and
    one generator (None: the global RNG) per row, and the rows' `logit_adjustments` -> token ids
    `[B]`. An all-greedy batch takes the argmax alone (no sort, no noise)."""
    logits = adjust_logits(logits, *adjustments)
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1)
    noise = exponential_noise(tuple(logits.shape), generators, logits.device)
    return sample(logits, *sampling_tensors(params, logits.device), noise, min_p_tensor(params, logits.device))


def exponential_noise(shape: tuple[int, ...], generators: list[torch.Generator | None],
                      device: torch.device | str) -> Tensor:
    """Exp(1) noise `[B, V]`, one generator per row so each request's draws are reproducible alone."""
    rows = []
    for g in generators:
        rows.append(torch.empty(shape[1:], device=device).exponential_(generator=g))
    return torch.stack(rows)
