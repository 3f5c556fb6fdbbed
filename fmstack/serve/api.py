"""OpenAI-compatible HTTP API (FastAPI) over an `Engine` running on its own thread.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics,
and vLLM's tokenizer routes (GET /tokenizer_info, POST /tokenize, POST /detokenize) so lm-eval's
`local-completions` model can tokenize through the server. Errors use OpenAI's JSON shape.

The implementation lives in `fmstack.serve.http`: `state` (what routes share), `middleware` (request
id, API key, body limit, access log, last-resort 500), `routes` (handlers), `bridge` (engine thread
<-> coroutines), `responses` (bodies, SSE, the per-choice accumulators), `schema` (OpenAPI bodies),
`app` (assembly). This module keeps the public names.
"""

from __future__ import annotations

from fmstack.serve.http.app import build_app
from fmstack.serve.http.state import ServerState

__all__ = ["ServerState", "build_app"]
