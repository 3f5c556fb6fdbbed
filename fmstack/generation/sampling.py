"""Sampling parameters (validated) and a batched, host-sync-free sampler.

`sample` takes per-row temperature/top-k/top-p tensors, so one compiled step serves rows with
different request parameters (`Generator` runs it inside its compiled step; the serving engine calls
it through `sample_rows`). Multinomial draws use the exponential race (argmax p_i / E_i with
E_i ~ Exp(1)), which needs no host synchronisation, unlike `torch.multinomial` on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fmstack.errors import ParameterError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; max_new_tokens counts generated tokens."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_tensors(params: list[SamplingParams], device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row temperature `[B]` (fp32), top_k `[B]` (int64), top_p `[B]` (fp32)."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    return temperature, top_k, top_p


def filtered_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """The sampling distribution `[B, V]` (fp32): softmax(logits / T) restricted to the top-k tokens,
    then to the smallest prefix of the sorted distribution whose mass reaches top_p (at least one
    token), renormalised. Rows with temperature 0 get a one-hot on the argmax."""
    logits = logits.float()
    scaled = logits / temperature.clamp_min(1e-5)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    drop = ranks[None, :] >= k[:, None]
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


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, noise: Tensor) -> Tensor:
    """logits `[B, V]`, per-row params `[B]`, noise `[B, V]` ~ Exp(1) -> token ids `[B]` (int64).

    Rows with temperature 0 take the argmax. Top-k keeps the k highest logits; top-p then keeps the
    smallest prefix of the sorted distribution whose mass reaches p (always at least one token).
    """
    sampled = draw(filtered_probs(logits, temperature, top_k, top_p), noise)
    return torch.where(temperature == 0, logits.argmax(dim=-1), sampled)


def sample_rows(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> Tensor:
    """The host-driven entry point (the serving engine): logits `[B, V]`, one `SamplingParams` and
    one generator (None: the global RNG) per row -> token ids `[B]`. An all-greedy batch takes the
    argmax alone (no sort, no noise)."""
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1)
    noise = exponential_noise(tuple(logits.shape), generators, logits.device)
    return sample(logits, *sampling_tensors(params, logits.device), noise)


def exponential_noise(shape: tuple[int, ...], generators: list[torch.Generator | None],
                      device: torch.device | str) -> Tensor:
    """Exp(1) noise `[B, V]`, one generator per row so each request's draws are reproducible alone."""
    rows = []
    for g in generators:
        rows.append(torch.empty(shape[1:], device=device).exponential_(generator=g))
    return torch.stack(rows)
