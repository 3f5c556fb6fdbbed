"""The FastAPI application: routes from routes.py over one `ServerState`, the ASGI middleware, and
the error handlers that turn APIError / Starlette's HTTP errors into OpenAI-shaped bodies."""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from fmstack.serve.http import routes, schema
from fmstack.serve.http.middleware import ServerMiddleware
from fmstack.serve.http.responses import error_response
from fmstack.serve.http.state import ServerState
from fmstack.serve.protocol import APIError

# (path, handler, method, openapi_extra, responses)
ROUTES = [
    ("/health", routes.health, "GET", None, schema.answers({"type": "object"})),
    ("/metrics", routes.metrics, "GET", None, schema.answers({"type": "string"}, media="text/plain")),
    ("/v1/models", routes.list_models, "GET", None, schema.answers({"type": "object"})),
    ("/v1/models/{name:path}", routes.get_model, "GET", None, schema.answers({"type": "object"}, 404)),
    ("/tokenizer_info", routes.tokenizer_info, "GET", None, schema.answers({"type": "object"}, 400)),
    ("/tokenize", routes.tokenize, "POST", schema.body(schema.TOKENIZE_REQUEST),
     schema.answers(schema.TOKENS, 400, 413)),
    ("/detokenize", routes.detokenize, "POST", schema.body(schema.DETOKENIZE_REQUEST),
     schema.answers(schema.TEXT, 400, 413)),
    ("/v1/completions", routes.completions, "POST", schema.body(schema.COMPLETION_REQUEST),
     schema.answers(schema.COMPLETION, 400, 404, 413, 429, 500, stream=True)),
    ("/v1/chat/completions", routes.chat, "POST", schema.body(schema.CHAT_REQUEST),
     schema.answers(schema.CHAT_COMPLETION, 400, 404, 413, 429, 500, stream=True)),
]


async def _api_error(_request: Request, e: APIError):
    return error_response(e)


async def _http_error(_request: Request, e: StarletteHTTPException):
    return error_response(APIError(e.status_code, str(e.detail),
                                   type="not_found_error" if e.status_code == 404 else None))


def build_app(state: ServerState) -> FastAPI:
    """The app (no OpenAPI route is served; `app.openapi()` gives the schema)."""
    app = FastAPI(title="fmstack", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fm = state
    state.created = state.created or int(time.time())
    app.add_middleware(ServerMiddleware, state=state)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for path, handler, method, extra, responses in ROUTES:
        app.add_api_route(path, handler, methods=[method], openapi_extra=extra, responses=responses)
    return app
