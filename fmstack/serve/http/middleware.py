"""The ASGI layer around every route: request id, API key, body-size limit, draining on shutdown,
response counts for /metrics, one access-log line per request, and the last-resort 500.

A 500 means a bug in the server, not bad input: it is logged as ONE line (request id, exception,
where it was raised; the traceback only at debug level) and answered with `Connection: close`, so
a keep-alive client never reuses a connection in an unknown state. Starlette's own handler for
`Exception` re-raises after answering, which made uvicorn log a second traceback; catching here
instead keeps it to one.
"""

from __future__ import annotations

import hmac
import logging
import time
import traceback
import uuid

from fmstack.serve.http.responses import error_response
from fmstack.serve.http.state import ServerState
from fmstack.serve.protocol import APIError

log = logging.getLogger("fmstack.serve.api")

OPEN_PATHS = ("/health",)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes")


def authorized(state: ServerState, path: str, headers: dict[bytes, bytes]) -> bool:
    """Every route needs the key when one is set, except /health (and /metrics with metrics_no_auth)."""
    if state.api_key is None or path in OPEN_PATHS or (path == "/metrics" and state.metrics_no_auth):
        return True
    scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"),
                                                              state.api_key.encode())


def _refusal(state: ServerState, path: str, headers: dict[bytes, bytes]) -> APIError | None:
    if state.draining and path not in OPEN_PATHS:
        return APIError(503, "the server is shutting down", code="shutting_down")
    if not authorized(state, path, headers):
        return APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    length = headers.get(b"content-length", b"")
    if length.isdigit() and int(length) > state.max_body_bytes:
        return too_large(state.max_body_bytes)
    return None


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"


class ServerMiddleware:
    """Pure ASGI middleware (see the module docstring). Routes record token counts for the access log
    in `scope["fmstack"]` (a dict: request_id, prompt_tokens, completion_tokens)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        info = scope["fmstack"] = {"request_id": uuid.uuid4().hex[:16]}
        status, t0 = [0], time.perf_counter()

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.state.counts[str(message["status"])] += 1
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", info["request_id"].encode())]
            await send(message)

        headers = dict(scope.get("headers", []))
        refusal = _refusal(self.state, scope["path"], headers)
        try:
            if refusal is not None:
                await error_response(refusal)(scope, receive, tracking_send)
            else:
                await self.app(scope, receive, tracking_send)
        except Exception as e:  # noqa: BLE001 - a bug: one log line, a 500 if nothing was sent yet
            log.error("request %s %s %s failed: %s: %s at %s", info["request_id"], scope["method"], scope["path"],
                      type(e).__name__, ascii(str(e))[1:-1][:300], _where(e))
            log.debug("traceback of request %s", info["request_id"], exc_info=True)
            if status[0] == 0:
                err = APIError(500, f"internal server error ({type(e).__name__}); request id {info['request_id']}")
                await error_response(err, headers={"connection": "close"})(scope, receive, tracking_send)
            else:  # mid-response: end the body; uvicorn closes the connection
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            log.info("%s %s %d prompt_tokens=%s completion_tokens=%s %.3fs id=%s", scope["method"], scope["path"],
                     status[0], info.get("prompt_tokens", "-"), info.get("completion_tokens", "-"),
                     time.perf_counter() - t0, info["request_id"])
