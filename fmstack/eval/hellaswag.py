"""HellaSwag, zero-shot, scored the lm-evaluation-harness way (see the data folder's README).

Context `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`, continuations
`" " + preprocess(ending)`, tokenized jointly (`encode_pair`). acc: argmax of the summed
log-probability; acc_norm: argmax of log-probability / characters of the ending (code points).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from fmstack.errors import FmstackError
from fmstack.eval.scoring import Scorer, encode_pair

log = logging.getLogger(__name__)

_REQUIRED = {"ind": int, "activity_label": str, "ctx_a": str, "ctx_b": str, "label": (int, str), "endings": list}
_MARKUP = re.compile(r"\[.*?\]")


def preprocess(text: str) -> str:
    """Strip, `" [title]"` -> `". "`, drop `[...]` markup, then collapse double spaces once."""
    text = text.strip().replace(" [title]", ". ")
    return _MARKUP.sub("", text).replace("  ", " ")


@dataclass
class Example:
    ind: int
    label: int
    context: str
    choices: list[str]  # preprocessed endings, without the delimiter space


def to_example(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Example(int(doc["ind"]), int(doc["label"]), preprocess(doc["activity_label"] + ": " + ctx),
                   [preprocess(e) for e in doc["endings"]])


def load_docs(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of a HellaSwag JSONL file (first `limit`); `FmstackError` naming the line for bad input."""
    path = Path(path)
    if not path.is_file():
        raise FmstackError(f"--data {path}: no such file")
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise FmstackError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            _check(doc, f"{path}:{lineno}")
            docs.append(doc)
    if not docs:
        raise FmstackError(f"--data {path}: the file has no rows")
    return docs


def _check(doc: object, where: str) -> None:
    if not isinstance(doc, dict):
        raise FmstackError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    for key, kind in _REQUIRED.items():
        if key not in doc:
            raise FmstackError(f"{where}: missing field {key!r}")
        if not isinstance(doc[key], kind):
            raise FmstackError(f"{where}: field {key!r} has type {type(doc[key]).__name__}")
    ends = doc["endings"]
    if len(ends) < 2 or not all(isinstance(e, str) for e in ends):
        raise FmstackError(f"{where}: 'endings' must be a list of at least 2 strings")
    label = doc["label"]
    if not str(label).isdigit() or not 0 <= int(label) < len(ends):
        raise FmstackError(f"{where}: 'label' {label!r} is not an index into the {len(ends)} endings")


def build_requests(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """Token requests, `len(choices)` per example in order."""
    return [encode_pair(tokenizer, ex.context, " " + c) for ex in examples for c in ex.choices]


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation / sqrt(n), as lm-eval reports; None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first index wins ties, like np.argmax


@dataclass
class RowResult:
    ind: int
    label: int
    loglik: list[float]
    cont_chars: list[int]
    cont_tokens: list[int]
    pred: int
    pred_norm: int


@dataclass
class HellaswagResult:
    rows: list[RowResult]
    seconds: float  # tokenization + scoring
    forward_tokens: int  # tokens run through the model (packed, no padding)

    @property
    def metrics(self) -> dict:
        n = len(self.rows)
        acc = [float(r.pred == r.label) for r in self.rows]
        acc_norm = [float(r.pred_norm == r.label) for r in self.rows]
        return {"n": n, "acc": sum(acc) / n, "acc_stderr": mean_stderr(acc),
                "acc_norm": sum(acc_norm) / n, "acc_norm_stderr": mean_stderr(acc_norm),
                "seconds": round(self.seconds, 3), "rows_per_s": round(n / self.seconds, 3),
                "tokens_per_s": round(self.forward_tokens / self.seconds, 1)}

    def write_predictions(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps(asdict(r)) + "\n")


def score_examples(examples: Sequence[Example], scores) -> list[RowResult]:
    rows, k = [], 0
    for ex in examples:
        n = len(ex.choices)
        sc = scores[k:k + n]
        k += n
        ll = [s.logprob for s in sc]
        chars = [len(c) for c in ex.choices]  # code points, not bytes
        norm = [x / max(c, 1) for x, c in zip(ll, chars)]
        rows.append(RowResult(ex.ind, ex.label, ll, chars, [s.n_tokens for s in sc], _argmax(ll), _argmax(norm)))
    return rows


def evaluate(model, tokenizer, docs: Sequence[dict], batch_size: int = 32, compile: bool = False,
             progress: bool = False) -> HellaswagResult:
    """Score every doc (a HellaSwag JSON row) with `model`; timing covers tokenization and scoring."""
    if tokenizer is None:
        raise FmstackError("hellaswag needs a model with a tokenizer")
    t0 = time.perf_counter()
    examples = [to_example(d) for d in docs]
    requests = build_requests(tokenizer, examples)
    scorer = Scorer(model, batch_size=batch_size, compile=compile, progress=progress)
    scores = scorer.score(requests)
    rows = score_examples(examples, scores)
    seconds = time.perf_counter() - t0
    log.info("hellaswag: %d rows in %.1fs (%d forwards, %d tokens, %.0f%% padding)", len(rows), seconds,
             scorer.stats.forwards, scorer.stats.forward_tokens,
             100 * (1 - scorer.stats.forward_tokens / max(scorer.stats.padded_tokens, 1)))
    return HellaswagResult(rows, seconds, scorer.stats.forward_tokens)
