"""Run the API app under uvicorn with the engine thread started and always shut down."""

from __future__ import annotations

import logging

from fmstack.errors import FmstackError

log = logging.getLogger(__name__)


def serve_app(app, engine, host: str, port: int) -> int:
    import uvicorn

    engine.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False)
    server = uvicorn.Server(config)
    log.info("serving on http://%s:%d (OpenAI API under /v1)", host, port)
    try:
        server.run()
    finally:
        engine.shutdown()
    if not server.started:
        raise FmstackError(f"could not start the server on {host}:{port} (is the port in use?)")
    return 0
