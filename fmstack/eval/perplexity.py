"""Sliding-window perplexity of a text, through the shared scoring path.

Windows of `max_length` tokens start every `stride` tokens; each window scores only the tokens the
previous window did not (the last `end - prev_end`), with the rest of the window as context, as in
HF's "perplexity of fixed-length models" recipe. A window's first token has no context and is never
scored: the text's first token (BOS when the tokenizer adds one), and with stride == max_length
(disjoint windows) the first token of every window. A smaller stride gives scored tokens more context.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fmstack.errors import FmstackError, ParameterError
from fmstack.eval.scoring import Scorer


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """`(begin, scored_from, end)` token ranges: the window is `[begin, end)`, scoring `[scored_from, end)`."""
    if stride <= 0 or stride > max_length:
        raise ParameterError(f"stride={stride} is invalid: must be in [1, max_length={max_length}]")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        scored_from = max(prev_end, begin + 1)
        if end > scored_from:
            out.append((begin, scored_from, end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def window_requests(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    return [(ids[b:s], ids[s:e]) for b, s, e in windows(len(ids), max_length, stride)]


@dataclass
class PerplexityResult:
    n_tokens: int  # scored tokens
    n_bytes: int  # bytes of the scored tokens
    n_words: int  # whitespace-separated words of the whole text (word perplexity is per word)
    nll: float  # summed negative log-likelihood (nats)
    n_windows: int
    seconds: float

    @property
    def metrics(self) -> dict:
        return {"tokens": self.n_tokens, "windows": self.n_windows, "nll": self.nll,
                "perplexity": math.exp(self.nll / self.n_tokens),
                "bits_per_byte": self.nll / math.log(2) / max(self.n_bytes, 1),
                "word_perplexity": math.exp(self.nll / max(self.n_words, 1)),
                "seconds": round(self.seconds, 3), "tokens_per_s": round(self.n_tokens / self.seconds, 1)}


def perplexity(model, tokenizer, text: str, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, progress: bool = False) -> PerplexityResult:
    """Perplexity of `text`; `max_length` defaults to the model's context, `stride` to `max_length`."""
    if tokenizer is None:
        raise FmstackError("perplexity needs a model with a tokenizer")
    max_length = max_length or model.config.max_seq_len
    if max_length < 2 or max_length > model.config.max_seq_len:
        raise ParameterError(f"max_length={max_length} is invalid: must be in [2, {model.config.max_seq_len}]")
    stride = stride or max_length
    t0 = time.perf_counter()
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise FmstackError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    requests = window_requests(ids, max_length, stride)
    scores = Scorer(model, batch_size=batch_size, max_length=max_length, progress=progress).score(requests)
    nll = -sum(s.logprob for s in scores)
    scored = [t for _, cont in requests for t in cont]
    n_bytes = sum(len(tokenizer.token_bytes(t)) for t in scored)
    return PerplexityResult(len(scored), n_bytes, len(re.findall(r"\S+", text)), nll, len(requests),
                            time.perf_counter() - t0)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FmstackError(f"--text {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FmstackError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
