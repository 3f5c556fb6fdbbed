"""OpenAI-compatible HTTP API (FastAPI) over an `Engine` running on its own thread.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics,
and vLLM's tokenizer routes (GET /tokenizer_info, POST /tokenize, POST /detokenize) so lm-eval's
`local-completions` model can tokenize through the server. Errors use OpenAI's JSON shape.
The engine calls back on its thread; outputs reach the request's coroutine through
`loop.call_soon_threadsafe` into an asyncio queue. A request whose client goes away (stream or
not) is aborted in the engine, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fmstack.errors import FmstackError, ParameterError
from fmstack.serve import metrics
from fmstack.serve.engine import Engine, PromptTooLong, QueueFull, RequestOutput, RequestParams, TokenLogprob
from fmstack.serve.protocol import APIError, bad, parse_chat, parse_completion, parse_json_body

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
POLL_S = 0.05  # how often a waiting request checks whether its client is still there


@dataclass
class ServerState:
    engine: Engine
    tokenizer: object | None
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    created: int = 0


class _Limits:
    """Pure ASGI middleware: counts responses by status for /metrics and refuses bodies whose
    Content-Length exceeds the limit (413) before they are read."""

    def __init__(self, app, state: ServerState, counts: Counter):
        self.app, self.state, self.counts = app, state, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[str(message["status"])] += 1
            await send(message)

        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.state.max_body_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    err = _too_large(self.state.max_body_bytes)
                    resp = JSONResponse(err.body(), status_code=err.status)
                    return await resp(scope, receive, counting_send)
        return await self.app(scope, receive, counting_send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes")


class _SSE(StreamingResponse):
    """A streaming response that runs `on_close` however the stream ends (done, error, disconnect)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="fmstack", docs_url=None, redoc_url=None, openapi_url=None)
    counts: Counter = Counter()
    app.add_middleware(_Limits, state=state, counts=counts)
    engine, tok = state.engine, state.tokenizer
    state.created = state.created or int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        err = APIError(e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception):
        log.exception("internal error")
        return JSONResponse(APIError(500, f"internal server error: {type(e).__name__}").body(), status_code=500)

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > state.max_body_bytes:
                raise _too_large(state.max_body_bytes)
            chunks.append(chunk)
        return parse_json_body(b"".join(chunks))

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found")

    def need_tokenizer(what: str) -> None:
        if tok is None:
            raise bad(what, "this model has no tokenizer: send token ids (prompt as a list of integers)")

    # -- engine bridge ---------------------------------------------------------------------------
    def submit(prompts: list[list[int]], params: list[RequestParams], base_id: str) -> tuple[list[str], asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def callback(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        ids: list[str] = []
        try:
            for i, (p, rp) in enumerate(zip(prompts, params)):
                rid = f"{base_id}-{i}"
                engine.add_request(rid, p, rp, callback)
                ids.append(rid)
        except QueueFull as e:
            for rid in ids:
                engine.abort(rid)
            raise APIError(429, str(e), code="queue_full") from None
        except PromptTooLong as e:
            for rid in ids:
                engine.abort(rid)
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except ParameterError as e:
            for rid in ids:
                engine.abort(rid)
            raise APIError(400, str(e), param="prompt") from None
        except FmstackError as e:  # the engine died
            raise APIError(503, str(e)) from None
        return ids, queue

    def abort_all(ids: list[str]) -> None:
        for rid in ids:
            engine.abort(rid)

    async def outputs(request: Request, queue: asyncio.Queue, ids: list[str]) -> AsyncIterator[RequestOutput]:
        """Engine outputs for `ids` until all finished; aborts them if the client disconnects."""
        pending = set(ids)
        next_check = time.monotonic() + POLL_S
        while pending:
            try:
                out = await asyncio.wait_for(queue.get(), POLL_S)
            except asyncio.TimeoutError:
                out = None
            if time.monotonic() >= next_check:  # checked while outputs flow too, not only when idle
                next_check = time.monotonic() + POLL_S
                if await request.is_disconnected():
                    log.info("client went away: aborting %s", ", ".join(sorted(pending)))
                    abort_all(list(pending))
                    return
            if out is None:
                continue
            if out.finished:
                pending.discard(out.request_id)
            yield out

    def check_length(prompt_ids: list[list[int]], max_tokens: int) -> None:
        limit = engine.max_model_len
        for p in prompt_ids:
            if len(p) + max_tokens > limit:
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                    f"requested {len(p) + max_tokens} tokens ({len(p)} in the prompt, "
                                    f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                               param="max_tokens", code="context_length_exceeded")

    def tokstr(t: int) -> str:
        return tok.decode([t]) if tok is not None else str(t)

    def engine_failed(out: RequestOutput) -> bool:
        return out.finish_reason == "abort" and engine.error is not None

    # -- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse(APIError(503, f"engine failed: {engine.error}").body(), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(engine.stats(), state.model_name, counts), media_type=metrics.CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "fmstack",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_key(request)
        check_model(name)
        return model_card()

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        need_tokenizer("tokenizer")
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.id_to_token(tok.pad_id) if tok.pad_id is not None else None,
                "chat_template": tok.chat_template, "add_bos_token": tok.add_bos,
                "model_max_length": engine.max_model_len, "vocab_size": tok.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        need_tokenizer("prompt")
        body = await read_body(request)
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise bad("add_special_tokens", "must be true or false")
        if "messages" in body:
            text = tok.apply_chat_template(parse_chat({"messages": body["messages"]}, tok.vocab_size).messages,
                                           add_generation_prompt=bool(body.get("add_generation_prompt", True)))
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise bad("prompt", "is required: a string (or send messages)")
        ids = tok.encode(text, add_bos=tok.add_bos and add)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        need_tokenizer("tokens")
        body = await read_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < tok.vocab_size for t in ids):
            raise bad("tokens", f"must be a list of token ids in [0, {tok.vocab_size})")
        return {"prompt": tok.decode(ids)}

    # -- /v1/completions -------------------------------------------------------------------------
    def completion_logprobs(entries: list[TokenLogprob | None]) -> dict:
        tokens, lps, tops = [], [], []
        for e in entries:
            if e is None:  # the first prompt token: nothing predicts it
                continue
            tokens.append(tokstr(e.token_id))
            lps.append(e.logprob)
            top = {tokstr(t): lp for t, lp in e.top}
            top.setdefault(tokstr(e.token_id), e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": []}

    def fill_offsets(lp: dict, start: int) -> dict:
        off, out = start, []
        for t in lp["tokens"]:
            out.append(off)
            off += len(t)
        lp["text_offset"] = out
        return lp

    def echo_logprobs(prompt: list[int], plps: list[TokenLogprob | None] | None) -> dict:
        """Prompt part of an echo response: first token with logprob null, as OpenAI does."""
        tokens = [tokstr(t) for t in prompt]
        lps: list = [None]
        tops: list = [None]
        for e in (plps or [None])[1:]:
            lps.append(e.logprob)
            top = {tokstr(t): lp for t, lp in e.top}
            top.setdefault(tokstr(e.token_id), e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": []}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await read_body(request)
        req = parse_completion(body, engine.vocab_size)
        if any(isinstance(p, str) for p in req.prompts):
            need_tokenizer("prompt")
        check_model(req.common.model)
        texts = [p if isinstance(p, str) else None for p in req.prompts]
        prompt_ids = [tok.encode(p) if isinstance(p, str) else p for p in req.prompts]
        if any(not p for p in prompt_ids):
            raise bad("prompt", "tokenizes to no tokens")
        max_tokens = DEFAULT_COMPLETION_TOKENS if req.common.max_tokens is None else req.common.max_tokens
        check_length(prompt_ids, max_tokens)
        try:
            sp = req.common.sampling_params(max_tokens)
        except ParameterError as e:
            raise APIError(400, str(e)) from None
        rp = RequestParams(sp, logprobs=req.logprobs,
                           prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                           stop_token_ids=req.common.stop_token_ids)
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        ids, queue = submit(prompt_ids, [rp] * len(prompt_ids), cid)
        index = {rid: i for i, rid in enumerate(ids)}
        echo_text = [(t if t is not None else (tok.decode(p) if tok is not None else "")) if req.echo else ""
                     for t, p in zip(texts, prompt_ids)]

        def chunk(choices: list, usage=None) -> dict:
            d = {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                 "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return d

        if req.common.stream:
            async def events():
                prompt_tokens = sum(len(p) for p in prompt_ids)
                completion_tokens = 0
                sent_echo: set[int] = set()
                text_pos = [0] * len(ids)
                async for out in outputs(request, queue, ids):
                    if engine_failed(out):
                        yield _sse(APIError(500, f"the engine failed: {engine.error}").body())
                        break
                    i = index[out.request_id]
                    text, lp = out.text, None
                    if req.logprobs is not None:
                        lp = completion_logprobs(out.logprobs or [])
                    if req.echo and i not in sent_echo:
                        sent_echo.add(i)
                        text = echo_text[i] + text
                        if req.logprobs is not None:
                            e = echo_logprobs(prompt_ids[i], out.prompt_logprobs)
                            for key in ("tokens", "token_logprobs", "top_logprobs"):
                                e[key] += lp[key]
                            lp = e
                    if lp is not None:
                        fill_offsets(lp, text_pos[i])
                    text_pos[i] += len(text)
                    if out.finished:
                        completion_tokens += out.completion_tokens
                    if text or out.finished or lp:
                        yield _sse(chunk([{"index": i, "text": text, "logprobs": lp,
                                           "finish_reason": out.finish_reason if out.finished else None}]))
                if req.common.include_usage:
                    yield _sse(chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}))
                yield "data: [DONE]\n\n"

            return _SSE(events(), lambda: abort_all(ids))

        texts_out = [""] * len(ids)
        entries: list[list[TokenLogprob]] = [[] for _ in ids]
        prompt_lps: list = [None] * len(ids)
        finish: list = [None] * len(ids)
        completion_tokens = 0
        try:
            async for out in outputs(request, queue, ids):
                i = index[out.request_id]
                if engine_failed(out):
                    raise APIError(500, f"the engine failed: {engine.error}")
                texts_out[i] += out.text
                entries[i].extend(out.logprobs or [])
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = out.prompt_logprobs
                if out.finished:
                    finish[i] = out.finish_reason
                    completion_tokens += out.completion_tokens
        finally:
            abort_all(ids)  # no-op for finished requests; frees the rest if this coroutine was cancelled
        if any(f is None for f in finish):
            return Response(status_code=499)  # client gone
        choices = []
        for i in range(len(ids)):
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(entries[i])
                if req.echo:
                    e = echo_logprobs(prompt_ids[i], prompt_lps[i])
                    for key in ("tokens", "token_logprobs", "top_logprobs"):
                        e[key] += lp[key]
                    lp = e
                fill_offsets(lp, 0)
            choices.append({"index": i, "text": echo_text[i] + texts_out[i], "logprobs": lp,
                            "finish_reason": finish[i]})
        prompt_tokens = sum(len(p) for p in prompt_ids)
        return chunk(choices, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens})

    # -- /v1/chat/completions --------------------------------------------------------------------
    def chat_logprobs(entries: list[TokenLogprob], k: int) -> list[dict]:
        def one(t: int, lp: float) -> dict:
            s = tokstr(t)
            return {"token": s, "logprob": lp, "bytes": list(tok.token_bytes(t)) if tok is not None else None}

        return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top[:k]]}
                for e in entries]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        body = await read_body(request)
        need_tokenizer("messages")
        req = parse_chat(body, engine.vocab_size)
        check_model(req.common.model)
        if not tok.chat_template:
            raise bad("messages", f"the model {state.model_name} has no chat template; use /v1/completions")
        try:
            text = tok.apply_chat_template(req.messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - template errors are the request's fault
            raise bad("messages", f"the chat template rejected the messages: {e}") from None
        prompt = tok.encode(text)
        max_tokens = req.common.max_tokens
        if max_tokens is None:
            max_tokens = engine.max_model_len - len(prompt)
            if max_tokens < 1:
                check_length([prompt], 1)
        check_length([prompt], max_tokens)
        try:
            sp = req.common.sampling_params(max_tokens)
        except ParameterError as e:
            raise APIError(400, str(e)) from None
        rp = RequestParams(sp, logprobs=req.top_logprobs if req.logprobs else None,
                           stop_token_ids=req.common.stop_token_ids)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        ids, queue = submit([prompt], [rp], cid)

        def chunk(choices: list, usage=None) -> dict:
            d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                 "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return d

        if req.common.stream:
            async def events():
                yield _sse(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]))
                completion_tokens = 0
                async for out in outputs(request, queue, ids):
                    if engine_failed(out):
                        yield _sse(APIError(500, f"the engine failed: {engine.error}").body())
                        break
                    lp = {"content": chat_logprobs(out.logprobs or [], req.top_logprobs)} if req.logprobs else None
                    if out.text or (lp and lp["content"]):
                        yield _sse(chunk([{"index": 0, "delta": {"content": out.text}, "logprobs": lp,
                                           "finish_reason": None}]))
                    if out.finished:
                        completion_tokens = out.completion_tokens
                        yield _sse(chunk([{"index": 0, "delta": {}, "logprobs": None,
                                           "finish_reason": out.finish_reason}]))
                if req.common.include_usage:
                    yield _sse(chunk([], {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                                          "total_tokens": len(prompt) + completion_tokens}))
                yield "data: [DONE]\n\n"

            return _SSE(events(), lambda: abort_all(ids))

        text_out, entries, finish, n_out = "", [], None, 0
        try:
            async for out in outputs(request, queue, ids):
                if engine_failed(out):
                    raise APIError(500, f"the engine failed: {engine.error}")
                text_out += out.text
                entries.extend(out.logprobs or [])
                if out.finished:
                    finish, n_out = out.finish_reason, out.completion_tokens
        finally:
            abort_all(ids)
        if finish is None:
            return Response(status_code=499)
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text_out},
                             "logprobs": {"content": chat_logprobs(entries, req.top_logprobs)} if req.logprobs
                             else None, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                          "total_tokens": len(prompt) + n_out}}

    return app
