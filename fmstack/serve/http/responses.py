"""Response builders, apart from the routes: error bodies, SSE framing, OpenAI envelopes, and one
accumulator per choice kind that turns engine outputs into what a client sees. The streaming and
the non-streaming answer of an endpoint are built by the same accumulator: a stream sends each
`add()` delta, a plain answer sends `choice()` at the end, so the two cannot drift apart.

`text_offset` is counted over the tokens' bytes with an incremental UTF-8 decoder, not over each
token's decoded string: a byte-level token holding half of a multi-byte character decodes alone to
U+FFFD, so counting those strings drifted one character per split character and could point past
the end of the returned text.
"""

from __future__ import annotations

import codecs
import json

from starlette.responses import Response, StreamingResponse

from fmstack.serve.engine import RequestOutput, TokenLogprob
from fmstack.serve.protocol import APIError
from fmstack.serve.tools import ToolOutput

SSE_DONE = "data: [DONE]\n\n"


def error_response(err: APIError, headers: dict | None = None) -> Response:
    """OpenAI's error body, JSON with ASCII escapes (it may quote any client text)."""
    return Response(json.dumps(err.body()), status_code=err.status, media_type="application/json",
                    headers=headers)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, cid: str, created: int, model: str, choices: list, usage: dict | None = None) -> dict:
    d = {"id": cid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        d["usage"] = usage
    return d


class TokenText:
    """Per-token strings and bytes (token ids themselves when the model has no tokenizer)."""

    def __init__(self, tok):
        self.tok = tok

    def piece(self, t: int) -> str:
        return self.tok.decode([t]) if self.tok is not None else str(t)

    def raw(self, t: int) -> bytes:
        return self.tok.token_bytes(t) if self.tok is not None else str(t).encode()

    def top(self, e: TokenLogprob) -> dict[str, float]:
        """{token: logprob} of the alternatives, the chosen token always included."""
        top = {self.piece(t): lp for t, lp in e.top}
        top.setdefault(self.piece(e.token_id), e.logprob)
        return top


class _Offsets:
    """Character offset of each token in the text, counted over the tokens' bytes."""

    def __init__(self, tt: TokenText):
        self.tt, self.chars = tt, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token_id: int) -> int:
        """Offset where `token_id` starts (a token that completes a character started by the previous
        one gets that character's offset), then advance past it."""
        at = self.chars
        self.chars += len(self.decoder.decode(self.tt.raw(token_id)))
        return at


class CompletionChoice:
    """One /v1/completions choice: `add()` returns the streamed delta of an output (None when there is
    nothing to send), `choice()` the whole answer."""

    def __init__(self, index: int, tt: TokenText, logprobs: int | None, echo_text: str | None,
                 prompt: list[int]):
        self.index, self.tt, self.want_lp = index, tt, logprobs is not None
        self.echo_text, self.prompt = echo_text, prompt
        self.text = ""
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._offsets = _Offsets(tt)

    def _entries(self, out: RequestOutput, echo: bool) -> list[tuple[int, float | None, dict | None]]:
        rows = []
        if echo:  # the prompt part: first token with logprob null, as OpenAI does
            plps = out.prompt_logprobs or [None]
            rows = [(t, None, None) for t in self.prompt[:1]]
            rows += [(e.token_id, e.logprob, self.tt.top(e)) for e in plps[1:]]
            rows += [(t, None, None) for t in self.prompt[len(rows):]]  # no prompt logprobs came
        rows += [(e.token_id, e.logprob, self.tt.top(e)) for e in (out.logprobs or []) if e is not None]
        return rows

    def add(self, out: RequestOutput) -> dict | None:
        echo = self.echo_text is not None
        text = (self.echo_text + out.text) if echo else out.text
        self.echo_text = None
        self.text += text
        lp = None
        if self.want_lp:
            rows = self._entries(out, echo)
            lp = {"tokens": [self.tt.piece(t) for t, _, _ in rows], "token_logprobs": [r[1] for r in rows],
                  "top_logprobs": [r[2] for r in rows],
                  "text_offset": [min(self._offsets.next(t), len(self.text)) for t, _, _ in rows]}
            for key, values in lp.items():
                self.lp[key].extend(values)
        if out.finished:
            self.finish_reason, self.completion_tokens = out.finish_reason, out.completion_tokens
        if not (text or out.finished or lp is not None):
            return None
        return {"index": self.index, "text": text, "logprobs": lp,
                "finish_reason": out.finish_reason if out.finished else None}

    def choice(self) -> dict:
        return {"index": self.index, "text": self.text, "logprobs": self.lp if self.want_lp else None,
                "finish_reason": self.finish_reason}


class ChatChoice:
    """The /v1/chat/completions choice: `add()` returns the streamed choice deltas of an output,
    `choice()` the whole message. With `tools`, content that is (or may become) a tool call is held
    back, and each call streams as OpenAI does: a `tool_calls` delta with its id, type and name once
    the name is written, then `function.arguments` fragments as they are generated. At the end the
    calls stand (finish_reason "tool_calls") only if they all parse; if not, the whole text is the
    content (its unsent part comes as a content delta) and finish_reason stays "stop" or "length":
    a client runs calls only on "tool_calls"."""

    def __init__(self, tt: TokenText, logprobs: bool, top_logprobs: int, index: int = 0,
                 tools: ToolOutput | None = None):
        self.tt, self.want_lp, self.k, self.index, self.tools = tt, logprobs, top_logprobs, index, tools
        self.text, self.lp_content = "", []
        self.content: str | None = None  # the message content once finished (tools: the text less the calls)
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def _one(self, t: int, lp: float) -> dict:
        return {"token": self.tt.piece(t), "logprob": lp,
                "bytes": list(self.tt.raw(t)) if self.tt.tok is not None else None}

    def add(self, out: RequestOutput) -> list[dict]:
        deltas = []
        content = [{**self._one(e.token_id, e.logprob), "top_logprobs": [self._one(t, lp) for t, lp in e.top[:self.k]]}
                   for e in (out.logprobs or [])] if self.want_lp else []
        self.text += out.text
        self.lp_content += content
        text, calls = (out.text, []) if self.tools is None else self.tools.update(self.text)
        if text or content:
            deltas.append({"index": self.index, "delta": {"content": text},
                           "logprobs": {"content": content} if self.want_lp else None, "finish_reason": None})
        deltas += [{"index": self.index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
                   for call in calls]
        if out.finished:
            self.finish_reason, self.completion_tokens = out.finish_reason, out.completion_tokens
            self.content = self.text
            if self.tools is not None:
                deltas += self._finish_tools()
            deltas.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": self.finish_reason})
        return deltas

    def _finish_tools(self) -> list[dict]:
        """Check the streamed calls; the content delta of what was held back when they are none."""
        self.content, calls, rest = self.tools.finish(self.text)
        if calls:
            self.finish_reason = "tool_calls" if self.finish_reason == "stop" else self.finish_reason
            return []
        return [{"index": self.index, "delta": {"content": rest}, "logprobs": None, "finish_reason": None}] if rest else []

    def choice(self) -> dict:
        message = {"role": "assistant", "content": self.text if self.tools is None else self.content}
        if self.tools is not None and self.tools.calls:
            message["tool_calls"] = self.tools.calls
        return {"index": self.index, "message": message,
                "logprobs": {"content": self.lp_content} if self.want_lp else None,
                "finish_reason": self.finish_reason}


class SSEResponse(StreamingResponse):
    """Server-sent events that run `on_close` however the stream ends (done, error, disconnect)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
