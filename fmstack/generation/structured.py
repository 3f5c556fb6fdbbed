"""Constrained decoding: a request's grammar (JSON schema, any JSON object, regex, a choice of
strings) compiled once, one matcher per sequence, and the allowed-token mask applied to that
sequence's logits row before sampling.

Engine: llguidance (Microsoft's Rust grammar engine, MIT, CPU wheels on PyPI), chosen over xgrammar
0.2.9 after both ran on SmolLM2's 49152-token vocabulary (`python -m benchmarks.grammar_engines`,
one CPU thread, results in benchmarks/results/grammar_engines_cpu.json): compiling a nested JSON
schema and starting a matcher took 1.2 ms (xgrammar: 16 ms), and filling + applying the mask took
0.16 ms per token at batch 1 (xgrammar: 0.28 ms) and 1.3 ms at batch 16 (xgrammar: 8.6 ms), since
llguidance computes masks lazily per state instead of precomputing them per grammar. Its one-off
cost is the tokenizer set-up (0.6 s, once per server, cached here per tokenizer).

Rows without a constraint pay nothing: the runner only builds a mask for the rows whose sequence
has a matcher (`apply_masks`). The serving runner fills the masks (`fill_masks`) on a thread while
the model step runs, since they depend only on the tokens accepted before the step: filled after
the step, they took 6.6% of decode time at batch 16 (`python -m benchmarks.structured_overhead`,
benchmarks/results/structured_overhead_cpu.json), over the 5% budget. The matcher advances with each accepted token (engine) and the
sequence finishes when the grammar is complete (`Matcher.done`).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.torch as llt
import torch
from torch import Tensor

from fmstack.errors import ParameterError

_LOCK = threading.Lock()


class _TokenSource:
    """What llguidance's TokenizerWrapper reads: every token's bytes, EOS, and an encoder."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = min(tok.eos_ids)
        self.bos_token_id = None
        self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.special_token_ids = sorted(tok.eos_ids)

    def __call__(self, s: str) -> list[int]:
        return self.tok.encode(s, add_bos=False)


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tok) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenSource(tok)))


def grammar_tokenizer(tok) -> llguidance.LLTokenizer:
    """llguidance's view of `tok` (0.6 s to build for a 49k vocabulary; built once per tokenizer)."""
    if tok is None or not getattr(tok, "eos_ids", None):
        raise ParameterError("structured output needs a model with a tokenizer that has an EOS token")
    with _LOCK:
        return _ll_tokenizer(tok)


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar for one request; each of its sequences gets its own `matcher()`."""

    kind: str  # json_schema | json_object | regex | choice
    grammar: str  # llguidance's grammar JSON
    tokenizer: Any  # llguidance.LLTokenizer

    def matcher(self) -> "Matcher":
        return Matcher(llguidance.LLMatcher(self.tokenizer, self.grammar), self.tokenizer.vocab_size)


def _choice_grammar(choices: list[str]) -> str:
    alternatives = " | ".join(json.dumps(c) for c in choices)
    return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")


def _json_grammar(schema: Any) -> str:
    """JSON on one line (no free whitespace: a small model can otherwise emit newlines until max_tokens)."""
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_COMPACT)


_COMPACT = {"whitespace_flexible": False}
_BUILDERS = {
    "json_schema": _json_grammar,
    "json_object": lambda _: _json_grammar({"type": "object"}),
    "regex": lambda v: llguidance.LLMatcher.grammar_from_regex(v),
    "choice": _choice_grammar,
}


def compile_constraint(tok, kind: str, value: Any = None) -> Constraint:
    """`kind` json_schema (value: the schema, a dict), json_object, regex (value: the pattern) or choice
    (value: a non-empty list of strings). Raises ParameterError saying what is wrong with `value`."""
    if kind not in _BUILDERS:
        raise ParameterError(f"unknown constraint kind {kind!r}: json_schema, json_object, regex or choice")
    try:
        grammar = _BUILDERS[kind](value)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ParameterError(f"the {kind.replace('_', ' ')} cannot be compiled: {str(e)[:300]}") from None
    lltok = grammar_tokenizer(tok)
    error = llguidance.LLMatcher.validate_grammar(grammar, lltok)  # "" when the grammar is fine
    if error:
        raise ParameterError(f"the {kind.replace('_', ' ')} cannot be compiled: {error[:300]}")
    return Constraint(kind, grammar, lltok)


class Matcher:
    """One sequence's grammar state."""

    __slots__ = ("m", "vocab")

    def __init__(self, m, vocab: int):
        self.m, self.vocab = m, vocab

    def accept(self, token_id: int) -> None:
        """Advance past an accepted token. Raises ParameterError if the grammar refuses it (it cannot,
        for a token drawn under this matcher's mask)."""
        if not self.m.consume_token(token_id) or self.m.is_error():
            raise ParameterError(f"the grammar refused token {token_id}: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """The output is complete: the grammar allows nothing more (EOS accepted or nothing can follow)."""
        return self.m.is_stopped()


@dataclass
class FilledMasks:
    """The constrained `rows` and their additive masks `add [len(rows), vocab]` (fp32: 0 for an
    allowed token, -inf for a forbidden one)."""

    rows: list[int]
    add: Tensor


@functools.lru_cache(maxsize=1)
def _byte_masks() -> Tensor:
    """`[256, 8]` fp32: entry [b, k] is 0 when bit k of byte b is set, else -inf."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, float("-inf"))


def fill_masks(matchers: list[Matcher | None]) -> FilledMasks | None:
    """The masks of the rows whose matcher is not None (None when there is none). llguidance fills
    its bitmasks with the GIL released and torch releases it too, so this can run on a thread while
    the model step runs (the serving runner does). The bitmask (bit t % 32 of word t // 32) becomes
    an additive mask through a byte table: adding it to the logits costs a fraction of
    llguidance's compiled masked_fill kernel (0.6 ms vs 2.4 ms at batch 16, 49152 tokens, one thread)."""
    idx = [i for i, m in enumerate(matchers) if m is not None]
    if not idx:
        return None
    vocab = matchers[idx[0]].vocab
    mask = llt.allocate_token_bitmask(len(idx), vocab)
    for j, i in enumerate(idx):
        llt.fill_next_token_bitmask(matchers[i].m, mask, j)
    if sys.byteorder == "little":  # byte j of the int32 words holds tokens 8j..8j+7
        add = _byte_masks()[mask.view(torch.uint8).long()].view(len(idx), -1)
    else:
        add = torch.where(((mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool(), 0.0, float("-inf"))
    return FilledMasks(idx, add.view(len(idx), -1)[:, :vocab])


def apply_masks(rows: Tensor, matchers: list[Matcher | None], filled: Future | None = None) -> None:
    """Mask in place the logits `rows [B, V]` of the rows whose matcher is not None (disallowed tokens
    to -inf); rows without one are left alone and cost nothing. `filled`: a future of
    `fill_masks(matchers)` started before the logits were computed (None: filled here)."""
    masks = filled.result() if filled is not None else fill_masks(matchers)
    if masks is None:
        return
    idx, width = masks.rows, min(masks.add.shape[1], rows.shape[1])
    add = masks.add[:, :width].to(rows.device, rows.dtype)
    if len(idx) == rows.shape[0]:
        rows[:, :width] += add
    else:
        rows[idx, :width] += add
    if width < rows.shape[1]:  # ids past the tokenizer's vocabulary decode to nothing: never allowed
        rows[idx, width:] = float("-inf")


def parse_response_format(v: Any) -> tuple[str, Any] | None:
    """OpenAI's `response_format` -> (kind, value) or None for plain text; ParameterError naming the
    sub-field otherwise."""
    if v is None:
        return None
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        raise ParameterError('must be an object with "type" one of text, json_object, json_schema')
    if v["type"] == "text":
        return None
    if v["type"] == "json_object":
        return ("json_object", None)
    js = v.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str):
        raise ParameterError('json_schema must be an object {"name": str, "schema": {...}, "strict": bool}')
    schema = js.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise ParameterError("json_schema.schema must be a JSON schema object")
    if js.get("strict") is not None and not isinstance(js["strict"], bool):
        raise ParameterError("json_schema.strict must be true or false")
    return ("json_schema", schema)

