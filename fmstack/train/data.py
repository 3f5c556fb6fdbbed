"""Training data: a text file or JSON lines -> fixed-length token windows with loss masks.

Formats (chosen by the file extension):

* `.txt`: the whole file is one token stream (BOS once, when the model adds one), cut into
  windows of `seq_len + 1` tokens that overlap by one token; every token is trained on.
* `.jsonl`: one JSON object per line, each one of
    - `{"prompt": str, "completion": str}`: loss on the completion (+ EOS) only;
    - `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the model's chat
      template; loss on the assistant turns only;
    - `{"text": str}`: loss on every token (+ EOS).

Every example becomes `inputs [L]` / `labels [L]` (int64, L = seq_len): labels[t] is the token after
inputs[t], or IGNORE where no loss is taken (prompt, padding). Short examples are padded at the end,
which causal attention never lets earlier tokens see. An example longer than `seq_len + 1` tokens
is an error (it names the line), never silently cut.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fmstack.errors import FmstackError, ParameterError

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions without loss (F.cross_entropy's ignore_index)
FORMATS = (".txt", ".jsonl")


class DataError(FmstackError):
    """The training data file is missing, empty or malformed; the message names the file and line."""


@dataclass
class TokenDataset:
    """`inputs`/`labels` `[N, L]` int64; `source` the file; `kind` txt | prompt-completion | chat | text | mixed."""

    inputs: Tensor
    labels: Tensor
    source: str
    kind: str

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def load_dataset(path: str | Path, tokenizer, seq_len: int | None, max_seq_len: int) -> TokenDataset:
    """Read `path` (.txt or .jsonl) into windows of `seq_len` tokens (None: 256 for text, the longest
    example for JSONL), checked against the model context `max_seq_len`."""
    p = Path(path)
    if p.suffix not in FORMATS:
        raise ParameterError(f"--data {p}: unsupported file type {p.suffix or '(none)'!r}; use .txt (plain text) "
                             "or .jsonl (prompt/completion, chat messages, or text per line)")
    if not p.is_file():
        raise DataError(f"--data {p}: file not found")
    if tokenizer is None:
        raise DataError(f"--data {p}: the model has no tokenizer to read text with (use a checkpoint that has one)")
    if seq_len is not None and not 1 <= seq_len <= max_seq_len:
        raise ParameterError(f"--seq-len {seq_len} is invalid: must be in [1, {max_seq_len}] "
                             f"(the model's context length)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data {p}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"--data {p}: the file is empty")
    if p.suffix == ".txt":
        return _text_windows(p, text, tokenizer, seq_len or min(256, max_seq_len))
    return _jsonl_examples(p, text, tokenizer, seq_len, max_seq_len)


def _text_windows(p: Path, text: str, tok, seq_len: int) -> TokenDataset:
    ids = tok.encode(text)
    if len(ids) < 2:
        raise DataError(f"--data {p}: only {len(ids)} token(s); training needs at least 2")
    rows = []
    for start in range(0, len(ids) - 1, seq_len):
        chunk = ids[start:start + seq_len + 1]
        rows.append((chunk, [True] * len(chunk)))
    log.info("%s: %d tokens -> %d windows of %d", p, len(ids), len(rows), seq_len)
    return _pack(rows, seq_len, _pad_id(tok), str(p), "txt")


def _jsonl_examples(p: Path, text: str, tok, seq_len: int | None, max_seq_len: int) -> TokenDataset:
    rows, kinds = [], set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data {p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        ids, mask, kind = _encode_record(obj, tok, where)
        if not any(mask[1:]):
            raise DataError(f"{where}: nothing to train on (the completion / assistant turns are empty)")
        rows.append((ids, mask, lineno))
        kinds.add(kind)
    if not rows:
        raise DataError(f"--data {p}: no examples (only blank lines)")
    longest = max(len(r[0]) for r in rows)
    limit = seq_len if seq_len is not None else max_seq_len
    too_long = [(len(ids), n) for ids, _, n in rows if len(ids) - 1 > limit]
    if too_long:
        n_tok, lineno = too_long[0]
        what = f"--seq-len {seq_len}" if seq_len is not None else f"the model's context ({max_seq_len} tokens)"
        hint = (f"; raise --seq-len (up to {max_seq_len})" if seq_len is not None and seq_len < max_seq_len
                else "; shorten or split it")
        raise DataError(f"--data {p}:{lineno}: example has {n_tok} tokens, longer than {what}{hint} "
                        f"({len(too_long)} example(s) too long)")
    if seq_len is None:
        seq_len = min(max_seq_len, -(-(longest - 1) // 16) * 16)  # the longest example, rounded up to 16
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    log.info("%s: %d %s examples, windows of %d tokens", p, len(rows), kind, seq_len)
    return _pack([(ids, mask) for ids, mask, _ in rows], seq_len, _pad_id(tok), str(p), kind)


def _encode_record(obj: dict, tok, where: str) -> tuple[list[int], list[bool], str]:
    """(ids, trainable-per-token, kind) of one JSONL record; mask[i] says whether ids[i] is a target."""
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if "messages" in obj:
        return (*_encode_chat(obj["messages"], tok, where), "chat")
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                found = "missing" if value is None else f"a {type(value).__name__}"
                raise DataError(f"{where}: field {name!r} must be a string ({found}); prompt/completion records "
                                "need both")
        a = tok.encode(prompt)
        b = tok.encode(completion, add_bos=False) + eos
        return a + b, [False] * len(a) + [True] * len(b), "prompt-completion"
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, found {type(obj['text']).__name__}")
        ids = tok.encode(obj["text"]) + eos
        return ids, [True] * len(ids), "text"
    raise DataError(f"{where}: missing fields: expected \"prompt\" and \"completion\", \"messages\" (chat), or "
                    f"\"text\"; found keys {sorted(obj)}")


def _encode_chat(messages, tok, where: str) -> tuple[list[int], list[bool]]:
    """Render with the chat template; tokens of each assistant turn (from the end of the generation
    prompt before it to the end of the turn) are trainable. Segments are tokenized one by one."""
    if not tok.chat_template:
        raise DataError(f"{where}: chat \"messages\" need a chat template, and this model's tokenizer has none")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no message has role 'assistant', so there is nothing to train on")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
            if not before.startswith(done):
                raise DataError(f"{where}: the chat template does not render messages as a growing prefix")
            segments.append((before[len(done):], False))
            done = before
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not full.startswith(done):
            raise DataError(f"{where}: the chat template does not render messages as a growing prefix")
        segments.append((full[len(done):], m["role"] == "assistant"))
        done = full
    ids: list[int] = []
    mask: list[bool] = []
    for text, train in segments:
        if not text:
            continue
        part = tok.encode(text, add_bos=None if not ids else False)
        ids += part
        mask += [train] * len(part)
    return ids, mask


def _pad_id(tok) -> int:
    for i in (tok.pad_id, tok.eos_id, 0):
        if i is not None:
            return i
    return 0


def _pack(rows: list[tuple[list[int], list[bool]]], seq_len: int, pad: int, source: str, kind: str) -> TokenDataset:
    """rows of (ids, target mask) with len(ids) <= seq_len + 1 -> padded inputs/labels `[N, seq_len]`."""
    inputs = torch.full((len(rows), seq_len), pad, dtype=torch.int64)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.int64)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[r, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        labels[r, :n] = torch.where(torch.tensor(mask[1:]), target, IGNORE)
    return TokenDataset(inputs, labels, source, kind)


class BatchSchedule:
    """Which rows each step trains on: the examples in a fresh seeded permutation each epoch, read
    as one endless stream; step s takes the stream's items [s*G, (s+1)*G) (G = global batch).
    Depends only on (seed, step), so a resumed run and any number of ranks see the same global batch."""

    def __init__(self, n_examples: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n_examples, global_batch, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if len(self._perms) > 2:  # a step spans at most a few epochs; keep memory bounded
                self._perms.clear()
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def rows(self, step: int) -> Tensor:
        """Example indices `[G]` of global step `step`."""
        start = step * self.global_batch
        out = []
        for pos in range(start, start + self.global_batch):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return torch.stack(out)
