"""When a sequence stops, in one place: `StopChecker` is used by `Generator`, `SpeculativeGenerator`
and the serving engine, so EOS, stop tokens, stop strings, max tokens and the context limit mean
the same everywhere and finish with the same reasons.

Finish reasons follow OpenAI: "stop" (an EOS / stop token or a stop string ended it; which one is
in `stop_reason`) and "length" (max tokens or the context limit). The engine adds "abort".
`IncrementalDetokenizer` lives here because stop strings are matched on its text.
"""

from __future__ import annotations

from typing import Collection, Sequence

from fmstack.generation.sampling import SamplingParams

STOP, LENGTH = "stop", "length"


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8 sequences and any
    tail that could still become a stop string.

    Each step decodes only the tokens since the last complete boundary (`_start`), and takes the
    text beyond what the same window decoded to before (`_prev`), so the cost per token stays flat
    and context-dependent decoding (e.g. sentencepiece's leading space) stays right."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # decoded text so far (complete characters only; cut at a stop string)
        self.emitted = 0
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that matched
        self._start, self._prev = 0, ""

    def add(self, token_id: int) -> str:
        """Append a token; return the newly printable text ('' while a character is incomplete)."""
        self.ids.append(token_id)
        window = self.tokenizer.decode(self.ids[self._start:])
        if window.endswith("\ufffd"):
            return ""  # a multi-byte character is still incomplete
        self.text += window[len(self._prev):]
        self._start, self._prev = max(len(self.ids) - 4, self._start), ""
        if self._start < len(self.ids):  # keep a few tokens of context for the next window
            self._prev = self.tokenizer.decode(self.ids[self._start:])
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped, self.stop_string = self.text[:at], True, s
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def flush(self) -> str:
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta


class StopChecker:
    """Stop state of one sequence. `add(token)` returns the new text and sets `finish_reason` (None
    while running) and `stop_reason` (the EOS / stop token id or the stop string that matched).

    eos_ids stop unless `params.ignore_eos`; `stop_token_ids` always stop. Stop tokens are counted
    as generated but never detokenized. Without a tokenizer there is no text and no stop strings.
    `max_len` limits prompt + generated tokens (the context length), `params.max_new_tokens` the
    generated ones; both finish with "length"."""

    def __init__(self, params: SamplingParams, eos_ids: Collection[int] = (), tokenizer=None, *,
                 stop_token_ids: Collection[int] = (), prompt_len: int = 0, max_len: int | None = None):
        self.params, self.prompt_len, self.max_len = params, prompt_len, max_len
        self.stop_ids = set(stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.detok = IncrementalDetokenizer(tokenizer, params.stop) if tokenizer is not None else None
        self.generated = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """All text so far (cut at a stop string)."""
        return self.detok.text if self.detok is not None else ""

    def end(self, reason: str = STOP) -> str:
        """Finish now for a reason decided outside (a completed grammar); returns the held-back text."""
        self.finish_reason = reason
        return self.detok.flush() if self.detok is not None else ""

    def add(self, token_id: int) -> str:
        """Account for one generated token; returns its text delta (with the held-back tail once finished)."""
        if self.finished:
            raise RuntimeError("StopChecker.add after the sequence finished")
        self.generated += 1
        delta = ""
        if token_id in self.stop_ids:
            self.finish_reason, self.stop_reason = STOP, token_id
        elif self.detok is not None:
            delta = self.detok.add(token_id)
            if self.detok.stopped:
                self.finish_reason, self.stop_reason = STOP, self.detok.stop_string
        if not self.finished and (self.generated >= self.params.max_new_tokens or (
                self.max_len is not None and self.prompt_len + self.generated >= self.max_len)):
            self.finish_reason = LENGTH
        if self.finished and self.detok is not None:
            delta += self.detok.flush()
        return delta
