"""Route handlers: module-level coroutines over the `ServerState` in `request.app.state.fm`.

Each request is validated once, in a `prepare_*` function that parses the body, checks every field
(protocol.py), checks the model name and tokenizes / renders the chat template. Those functions run
on the state's bounded worker pool, never on the event loop: tokenizing a 1 MB prompt takes tens of
milliseconds of pure CPU, during which /health and every open stream would otherwise stall (see
docs/serve.md, "Hardening", for the measured /health latency). The prompt-length limit is checked
by the engine alone (`PromptTooLong` -> 400 in bridge.submit).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fmstack.errors import ParameterError
from fmstack.generation.structured import Constraint, compile_constraint
from fmstack.serve import metrics as prom
from fmstack.serve.engine import RequestParams
from fmstack.serve.http.bridge import ShuttingDown, abort_all, engine_failure, outputs, submit
from fmstack.serve.http.middleware import too_large
from fmstack.serve.http.responses import (SSE_DONE, ChatChoice, CompletionChoice, SSEResponse, TokenText,
                                          envelope, error_response, sse, usage)
from fmstack.serve.http.state import ServerState
from fmstack.serve.protocol import (APIError, ChatRequest, CompletionRequest, bad, check_text, parse_chat,
                                    parse_completion, parse_json_body)
from fmstack.serve.tools import ToolOutput, call_schema, parser_for, template_supports_tools

log = logging.getLogger("fmstack.serve.api")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
TEXT_SLACK = 2  # a text is surely too long past 2 x (longest token's bytes) x max_model_len bytes
SHUTDOWN_MESSAGE = "the server shut down before this request finished"


def _state(request: Request) -> ServerState:
    return request.app.state.fm


async def _read_body(request: Request, state: ServerState) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body_bytes:
            raise too_large(state.max_body_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model {ascii(name)[:80]} does not exist; this server serves "
                            f"'{state.model_name}'", param="model", code="model_not_found")


def _need_tokenizer(state: ServerState, what: str) -> None:
    if state.tokenizer is None:
        raise bad(what, "this model has no tokenizer: send token ids (prompt as a list of integers)")


def _check_fits(state: ServerState, text: str, param: str) -> None:
    """Refuse a text that cannot fit the context whatever its tokenization (every token covers at most
    `max_token_bytes` bytes; x TEXT_SLACK for normalizers), before spending seconds tokenizing it."""
    limit = state.engine.max_model_len
    n_bytes = len(text.encode("utf-8"))
    least = n_bytes // (TEXT_SLACK * state.max_token_bytes())
    if least > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                            f"({n_bytes} bytes) has more than {least} tokens. Please reduce the prompt.",
                       param=param, code="context_length_exceeded")


def _account(request: Request, prompt_tokens: int, completion_tokens: int) -> None:
    """Token counts for the access-log line (middleware)."""
    info = request.scope.get("fmstack")
    if info is not None:
        info.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


# -- small routes ----------------------------------------------------------------------------------
async def health(request: Request):
    engine = _state(request).engine
    if engine.error is not None:
        return error_response(APIError(503, f"engine failed: {ascii(str(engine.error))[1:-1]}"))
    return {"status": "ok"}


async def metrics(request: Request):
    state = _state(request)
    return Response(prom.render(state.engine.stats(), state.model_name, state.counts), media_type=prom.CONTENT_TYPE)


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "fmstack",
            "max_model_len": state.engine.max_model_len}


async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(_state(request))]}


async def get_model(name: str, request: Request):
    state = _state(request)
    check_text(name, "model")
    _check_model(state, name)
    return _model_card(state)


async def tokenizer_info(request: Request):
    state = _state(request)
    _need_tokenizer(state, "tokenizer")
    tok = state.tokenizer
    return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": tok.id_to_token(tok.pad_id) if tok.pad_id is not None else None,
            "chat_template": tok.chat_template, "add_bos_token": tok.add_bos,
            "model_max_length": state.engine.max_model_len, "vocab_size": tok.vocab_size}


def _prepare_tokenize(state: ServerState, raw: bytes) -> Response:
    """The /tokenize answer, rendered here on the worker pool (a 1 MB text is ~300k ids of JSON)."""
    tok = state.tokenizer
    body = parse_json_body(raw)
    add = body.get("add_special_tokens", True)
    if not isinstance(add, bool):
        raise bad("add_special_tokens", "must be true or false")
    if "messages" in body:
        gen = body.get("add_generation_prompt", True)
        if not isinstance(gen, bool):
            raise bad("add_generation_prompt", "must be true or false")
        text = _render(state, parse_chat({"messages": body["messages"]}, tok.vocab_size).messages, gen)
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise bad("prompt", "is required: a string (or send messages)")
    ids = tok.encode(text, add_bos=tok.add_bos and add)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len})


async def tokenize(request: Request):
    state = _state(request)
    _need_tokenizer(state, "prompt")
    return await state.run_blocking(_prepare_tokenize, state, await _read_body(request, state))


def _detokenize(state: ServerState, raw: bytes) -> dict:
    tok = state.tokenizer
    ids = parse_json_body(raw).get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            and 0 <= t < tok.vocab_size for t in ids):
        raise bad("tokens", f"must be a list of token ids in [0, {tok.vocab_size})")
    return {"prompt": tok.decode(ids)}


async def detokenize(request: Request):
    state = _state(request)
    _need_tokenizer(state, "tokens")
    return JSONResponse(await state.run_blocking(_detokenize, state, await _read_body(request, state)))


# -- shared by both generation routes -----------------------------------------------------------------
async def _feed(state: ServerState, acc, out, heavy: bool):
    """acc.add(out), on the worker pool when it detokenizes many tokens (logprobs, echo)."""
    return await state.run_blocking(acc.add, out) if heavy else acc.add(out)


async def _guarded(events: AsyncIterator[str], request: Request) -> AsyncIterator[str]:
    """A stream that always ends with `[DONE]`: an error event first if the shutdown grace period ran
    out (503) or the server failed (500, logged as one line)."""
    try:
        async for item in events:
            yield item
        return
    except ShuttingDown:
        yield sse(APIError(503, SHUTDOWN_MESSAGE, code="shutting_down").body())
    except Exception as e:  # noqa: BLE001 - a bug mid-stream: the headers are gone, so an error event
        rid = request.scope.get("fmstack", {}).get("request_id")
        log.error("stream of request %s failed: %s: %s", rid, type(e).__name__, ascii(str(e))[1:-1][:300])
        log.debug("traceback of request %s", rid, exc_info=True)
        yield sse(APIError(500, f"internal server error ({type(e).__name__}); request id {rid}").body())
    yield SSE_DONE


async def _collect(request: Request, state: ServerState, queue, ids: list[str], accs: dict, heavy: bool) -> bool:
    """Feed every output to its accumulator; False if the client went away first."""
    try:
        async for out in outputs(request, state, queue, ids):
            failure = engine_failure(state, out)
            if failure:
                raise APIError(500, failure)
            await _feed(state, accs[out.request_id], out, heavy)
    except ShuttingDown:
        raise APIError(503, SHUTDOWN_MESSAGE, code="shutting_down") from None
    finally:
        abort_all(state, ids)  # no-op for finished requests; frees the rest if this coroutine was cancelled
    return all(a.finish_reason is not None for a in accs.values())


def _request_params(req: CompletionRequest | ChatRequest, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None, constraint: Constraint | None = None) -> list[RequestParams]:
    """One RequestParams per choice of a prompt (`n`; see `Common.sampling_params` for their seeds)."""
    try:
        sps = [req.common.sampling_params(max_tokens, j) for j in range(req.common.n)]
    except ParameterError as e:
        raise APIError(400, str(e), param=e.field) from None
    return [RequestParams(sp, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                          stop_token_ids=req.common.stop_token_ids, constraint=constraint) for sp in sps]

CONSTRAINT_PARAM = {"json_schema": "response_format", "json_object": "response_format", "regex": "guided_regex",
                    "choice": "guided_choice"}


def _compile(state: ServerState, spec: tuple | None, param: str | None = None) -> Constraint | None:
    """The request's output constraint compiled for this tokenizer (worker pool); 400 naming the field."""
    if spec is None:
        return None
    param = param or CONSTRAINT_PARAM[spec[0]]
    _need_tokenizer(state, param)
    try:
        return compile_constraint(state.tokenizer, *spec)
    except ParameterError as e:
        raise bad(param, str(e)) from None


# -- /v1/completions -----------------------------------------------------------------------------------
def _prepare_completion(state: ServerState, raw: bytes) -> tuple[CompletionRequest, list[list[int]], list,
                                                                  Constraint | None]:
    """Parse, validate and tokenize (worker pool). Returns the request, prompt ids, each prompt's
    echo text (None without echo) and the compiled output constraint."""
    tok = state.tokenizer
    req = parse_completion(parse_json_body(raw), state.engine.vocab_size)
    if any(isinstance(p, str) for p in req.prompts):
        _need_tokenizer(state, "prompt")
    _check_model(state, req.common.model)
    for p in req.prompts:
        if isinstance(p, str):
            _check_fits(state, p, "prompt")
    prompt_ids = [tok.encode(p) if isinstance(p, str) else p for p in req.prompts]
    if any(not p for p in prompt_ids):
        raise bad("prompt", "tokenizes to no tokens")
    echo = [(p if isinstance(p, str) else tok.decode(ids) if tok is not None else "") if req.echo else None
            for p, ids in zip(req.prompts, prompt_ids)]
    return req, prompt_ids, echo, _compile(state, req.common.constraint)


async def completions(request: Request):
    state = _state(request)
    req, prompt_ids, echo, constraint = await state.run_blocking(_prepare_completion, state,
                                                                 await _read_body(request, state))
    max_tokens = DEFAULT_COMPLETION_TOKENS if req.common.max_tokens is None else req.common.max_tokens
    rp = _request_params(req, max_tokens, req.logprobs,
                         req.logprobs if req.echo and req.logprobs is not None else None, constraint)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    n = req.common.n  # choice i * n + j is choice j of prompt i, as OpenAI orders them
    ids, queue = submit(state, [p for p in prompt_ids for _ in range(n)], rp * len(prompt_ids), cid, n)
    tt = TokenText(state.tokenizer)
    accs = {rid: CompletionChoice(c, tt, req.logprobs, echo[c // n], prompt_ids[c // n]) for c, rid in enumerate(ids)}
    heavy = req.logprobs is not None
    n_prompt = sum(len(p) for p in prompt_ids)

    def done() -> int:
        n = sum(a.completion_tokens for a in accs.values())
        _account(request, n_prompt, n)
        return n

    if req.common.stream:
        async def events():
            async for out in outputs(request, state, queue, ids):
                failure = engine_failure(state, out)
                if failure:
                    yield sse(APIError(500, failure).body())
                    break
                delta = await _feed(state, accs[out.request_id], out, heavy)
                if delta is not None:
                    yield sse(envelope("text_completion", cid, created, state.model_name, [delta]))
            n = done()
            if req.common.include_usage:
                yield sse(envelope("text_completion", cid, created, state.model_name, [], usage(n_prompt, n)))
            yield SSE_DONE

        return SSEResponse(_guarded(events(), request), lambda: abort_all(state, ids))

    if not await _collect(request, state, queue, ids, accs, heavy):
        return Response(status_code=499)  # client gone
    choices = [accs[rid].choice() for rid in ids]
    return JSONResponse(envelope("text_completion", cid, created, state.model_name, choices, usage(n_prompt, done())))


# -- /v1/chat/completions ------------------------------------------------------------------------------
def _render(state: ServerState, messages: list[dict], add_generation_prompt: bool = True,
            tools: list[dict] | None = None) -> str:
    tok = state.tokenizer
    if not tok.chat_template:
        raise bad("messages", f"the model {state.model_name} has no chat template; use /v1/completions")
    try:
        extra = {"tools": tools} if tools else {}
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as e:  # noqa: BLE001 - template errors are the request's fault
        raise bad("messages", f"the chat template rejected the messages: {ascii(str(e))[1:-1][:300]}") from None


def _prepare_chat(state: ServerState, raw: bytes) -> tuple[ChatRequest, list[int], Constraint | None,
                                                            ToolOutput | None]:
    """Parse, validate, render the chat template (with the tools) and tokenize, compile the output
    constraint (worker pool)."""
    body = parse_json_body(raw)
    _need_tokenizer(state, "messages")
    req = parse_chat(body, state.engine.vocab_size)
    _check_model(state, req.common.model)
    tools = req.tools if req.tool_choice != "none" else None
    template = state.tokenizer.chat_template
    if tools and not template_supports_tools(template):
        raise bad("tools", f"the chat template of {state.model_name} does not render tools, so the model cannot "
                           "be told about them; send tool_choice \"none\" or use a model whose template takes tools")
    text = _render(state, req.messages, tools=tools)
    _check_fits(state, text, "messages")
    if tools and req.tool_choice != "auto":  # required / a named function: the output is one call
        name = req.tool_choice["name"] if isinstance(req.tool_choice, dict) else None
        constraint = _compile(state, ("json_schema", call_schema(tools, name)), "tools")
        return req, state.tokenizer.encode(text), constraint, ToolOutput("forced")
    tool_out = ToolOutput(parser_for(template)) if tools else None
    return req, state.tokenizer.encode(text), _compile(state, req.common.constraint), tool_out


async def chat(request: Request):
    state = _state(request)
    req, prompt, constraint, tool_out = await state.run_blocking(_prepare_chat, state,
                                                                 await _read_body(request, state))
    max_tokens = req.common.max_tokens
    if max_tokens is None:  # up to the length limit (at least 1, so an over-long prompt gets the length error)
        max_tokens = max(state.engine.max_model_len - len(prompt), 1)
    rp = _request_params(req, max_tokens, req.top_logprobs if req.logprobs else None, constraint=constraint)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    ids, queue = submit(state, [prompt] * req.common.n, rp, cid, req.common.n)
    tt = TokenText(state.tokenizer)
    accs = {rid: ChatChoice(tt, req.logprobs, req.top_logprobs, j,
                            ToolOutput(tool_out.parser) if tool_out is not None else None)  # per-choice state
            for j, rid in enumerate(ids)}
    heavy = req.logprobs

    def done() -> int:  # completion tokens over all choices
        return sum(a.completion_tokens for a in accs.values())

    def chunk(choices: list, use: dict | None = None) -> str:
        return sse(envelope("chat.completion.chunk", cid, created, state.model_name, choices, use))

    if req.common.stream:
        async def events():
            for j in range(len(ids)):
                yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for out in outputs(request, state, queue, ids):
                failure = engine_failure(state, out)
                if failure:
                    yield sse(APIError(500, failure).body())
                    break
                for delta in await _feed(state, accs[out.request_id], out, heavy):
                    yield chunk([delta])
            _account(request, len(prompt), done())
            if req.common.include_usage:
                yield chunk([], usage(len(prompt), done()))
            yield SSE_DONE

        return SSEResponse(_guarded(events(), request), lambda: abort_all(state, ids))

    if not await _collect(request, state, queue, ids, accs, heavy):
        return Response(status_code=499)
    _account(request, len(prompt), done())
    return JSONResponse(envelope("chat.completion", cid, created, state.model_name, [accs[r].choice() for r in ids],
                                 usage(len(prompt), done())))

