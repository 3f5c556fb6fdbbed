"""The bridge between request coroutines and the engine thread.

The engine calls back on its own thread; outputs reach the request's coroutine through
`loop.call_soon_threadsafe` into an asyncio queue. A request whose client goes away (stream or
not) is aborted in the engine, which frees its KV blocks at once; so is one still running when the
shutdown grace period ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from starlette.requests import Request

from fmstack.errors import FmstackError, ParameterError
from fmstack.serve.engine import PromptTooLong, QueueFull, RequestOutput, RequestParams
from fmstack.serve.http.state import ServerState
from fmstack.serve.protocol import APIError

log = logging.getLogger("fmstack.serve.api")

POLL_S = 0.05  # how often a waiting request checks whether its client is still there


class ShuttingDown(Exception):
    """The shutdown grace period ended while the request was still running (it has been aborted)."""


def engine_failure(state: ServerState, out: RequestOutput) -> str | None:
    """Why the engine failed this request, or None if it did not. The one place that recognises an
    engine failure: the engine sets `RequestOutput.error` on the requests whose step raised (only
    those; the others go on), and on every request when it died (then `engine.error` is set too)."""
    if out.error is not None:
        return f"the engine failed this request: {ascii(out.error)[1:-1][:300]}; request id {out.request_id}"
    return None


def submit(state: ServerState, prompts: list[list[int]], params: RequestParams | list[RequestParams],
           base_id: str, n: int = 1) -> tuple[list[str], asyncio.Queue]:
    """Queue one engine request per prompt (ids `base_id-i`; `params` one for all or one per prompt);
    all or none are queued. `n`: prompts come in runs of n copies (choices); each copy waits for the
    first one's prefill and takes its KV blocks from the prefix cache. The engine owns the length
    check (prompt + max_tokens <= max_model_len): its PromptTooLong becomes a 400."""
    engine = state.engine
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def callback(out: RequestOutput) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, out)

    ids: list[str] = []
    try:
        for i, p in enumerate(prompts):
            rid = f"{base_id}-{i}"
            engine.add_request(rid, p, params[i] if isinstance(params, list) else params, callback,
                               after=ids[i - i % n] if i % n else None)
            ids.append(rid)
    except QueueFull as e:
        abort_all(state, ids)
        raise APIError(429, str(e), code="queue_full") from None
    except PromptTooLong as e:
        abort_all(state, ids)
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    except ParameterError as e:
        abort_all(state, ids)
        raise APIError(400, str(e), param=e.field or "prompt") from None
    except FmstackError as e:  # the engine died
        abort_all(state, ids)
        raise APIError(503, str(e)) from None
    return ids, queue


def abort_all(state: ServerState, ids: list[str]) -> None:
    for rid in ids:
        state.engine.abort(rid)


async def outputs(request: Request, state: ServerState, queue: asyncio.Queue,
                  ids: list[str]) -> AsyncIterator[RequestOutput]:
    """Engine outputs for `ids` until all finished. Aborts them and stops if the client disconnects;
    aborts them and raises ShuttingDown when the shutdown grace period ends."""
    pending = set(ids)
    next_check = time.monotonic() + POLL_S
    stop = state.stop_event
    while pending:
        try:
            out = await asyncio.wait_for(queue.get(), POLL_S)
        except asyncio.TimeoutError:
            out = None
        if stop.is_set():
            abort_all(state, list(pending))
            raise ShuttingDown()
        if time.monotonic() >= next_check:  # checked while outputs flow too, not only when idle
            next_check = time.monotonic() + POLL_S
            if await request.is_disconnected():
                log.info("client went away: aborting %s", ", ".join(sorted(pending)))
                abort_all(state, list(pending))
                return
        if out is None:
            continue
        if out.finished:
            pending.discard(out.request_id)
        yield out
