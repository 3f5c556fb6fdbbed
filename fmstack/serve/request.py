"""What the engine's three parts pass each other: a request's parameters and state (`Sequence`:
tokens, blocks and progress for the scheduler, sampling parameters and generator for the runner,
stops and callback for the engine), one step's plan (`SchedulerOutput`) and its result
(`RunnerOutput`). Kept apart from all three so none imports another's module for its types and the
scheduler can be driven and tested without a model or a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fmstack.errors import ParameterError
from fmstack.generation.sampling import SamplingParams
from fmstack.generation.stopping import StopChecker

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class RequestParams:
    """Sampling (max tokens, temperature, top-k/p, seed, stop strings) plus outputs wanted:
    `logprobs` top-k alternatives per generated token (None: no logprobs), `prompt_logprobs`
    the same for prompt tokens (echo)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    constraint: object | None = None  # a structured.Constraint: each sequence gets its own matcher

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


class Sequence:
    """A request inside the engine. Scheduler fields: `tokens` (prompt + generated), `num_computed`
    (tokens whose K/V are in the cache), `blocks` (block table), `n_hashed`/`parent_hash` (leading
    blocks registered in the prefix cache), `draft` (speculative proposals for the next step, set by
    `speculation.NgramProposer`; empty: none). Engine fields: `stops`, `callback`, `prompt_lps`,
    `matcher` (the grammar state of a constrained request: the runner masks with it, the engine
    advances it)."""

    __slots__ = ("id", "arrival", "prompt_len", "tokens", "params", "callback", "num_computed", "blocks",
                 "n_hashed", "parent_hash", "stops", "prompt_lps", "prompt_sent", "generator", "finished",
                 "finish_reason", "preemptions", "matcher", "draft")

    def __init__(self, rid: str, prompt: list[int], params: RequestParams, arrival: int = 0, *,
                 stops: StopChecker | None = None, callback: Callable | None = None,
                 device: torch.device | str = "cpu"):
        self.id, self.arrival, self.params, self.callback = rid, arrival, params, callback
        self.prompt_len = len(prompt)
        self.tokens = list(prompt)
        self.num_computed = 0
        self.blocks: list[int] = []
        self.n_hashed = 0
        self.parent_hash: int | None = None
        self.stops = stops
        self.prompt_lps: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_sent = False
        self.generator = None
        if params.sampling.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.sampling.seed)
        self.finished = False
        self.finish_reason: str | None = None
        self.preemptions = 0
        self.matcher = params.constraint.matcher() if params.constraint is not None else None  # grammar state
        self.draft: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_lps is not None and len(self.prompt_lps) < self.prompt_len


@dataclass(frozen=True)
class ScheduledChunk:
    """One sequence's share of a step, copied at schedule time (an abort while the step runs changes
    the sequence, not this): compute `token_ids` at positions start.., whose K/V go to the slots of
    `block_table`; `all_logits`: logits at every position (prompt logprobs); `sample`: draw the
    next token from the last position's logits."""

    seq: Sequence
    start: int
    token_ids: tuple[int, ...]
    block_table: tuple[int, ...]
    all_logits: bool
    sample: bool
    draft: tuple[int, ...] = ()  # speculative proposals: the tail of token_ids, verified at every position

    @property
    def n(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """One step's work (`Scheduler.schedule`) and the requests preempted to make room for it."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.n for c in self.chunks)


@dataclass
class RunnerOutput:
    """What one step computed, per request id, as host values only (ints, floats, lists): nothing
    here aliases a compiled step's output buffer, which the next replay (CUDA graphs) overwrites.
    `prompt_logprobs[rid][j]` scores prompt token `start + j + 1` (None past the prompt); `failed`
    holds the requests whose step raised (the error text), filled by the engine's fault isolation.
    `accepted[rid]`: a speculative chunk's accepted proposals, which come before `sampled[rid]`."""

    sampled: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob | None]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def merge(self, other: "RunnerOutput") -> None:
        for name in ("sampled", "accepted", "logprobs", "prompt_logprobs", "failed"):
            getattr(self, name).update(getattr(other, name))
