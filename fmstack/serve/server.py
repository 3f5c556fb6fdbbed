"""Run the API app under uvicorn with the engine thread started and always shut down, and size the KV
cache when the user did not.

Graceful shutdown: SIGTERM (or Ctrl-C) stops accepting connections and marks the state draining
(new requests on open connections get 503); requests in flight keep running for up to
`shutdown_grace` seconds; then those still running are aborted, each stream ending with an SSE error
event and `[DONE]`. The engine thread and the worker pool are shut down whatever happens, and the
process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import torch

from fmstack.errors import FmstackError
from fmstack.serve.paged_cache import PagedKVCache

log = logging.getLogger(__name__)

KV_MEMORY_FRACTION = 0.25  # at most this share of available memory for the KV cache by default
EXTRA_GRACE_S = 5.0  # uvicorn's own wait beyond ours: streams ended at the grace deadline close meanwhile


def available_memory_bytes(device) -> int | None:
    """Free memory where the KV cache will live: the GPU's free memory, else MemAvailable of /proc/meminfo."""
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_cache_budget(bytes_per_block: int, block_size: int, max_num_seqs: int, max_model_len: int,
                        available: int | None, fraction: float = KV_MEMORY_FRACTION) -> int:
    """Enough blocks for `max_num_seqs` full-length sequences, capped at `fraction` of the available
    memory (but never below one full-length sequence, which the engine needs)."""
    per_seq = -(-max_model_len // block_size)
    want = max_num_seqs * per_seq * bytes_per_block
    floor = per_seq * bytes_per_block
    if available is not None:
        want = min(want, int(available * fraction))
    return max(want, floor)


def auto_kv_cache_bytes(model, block_size: int, max_num_seqs: int, max_model_len: int) -> int:
    """The KV cache size for `model` when the user gave none (kv_cache_budget of the available memory), logged."""
    p = next(model.parameters())
    dtype = p.dtype if p.dtype.is_floating_point else torch.float32  # as the engine allocates it
    per_block = PagedKVCache.bytes_per_block(model.config, block_size, dtype)
    available = available_memory_bytes(p.device)
    size = kv_cache_budget(per_block, block_size, max_num_seqs, max_model_len, available)
    log.info("KV cache: %.1f MiB (%d sequences x %d tokens; %s MiB available, at most %d%% used); "
             "set --kv-cache-mb to override", size / 2**20, max_num_seqs, max_model_len,
             "?" if available is None else f"{available / 2**20:.0f}", round(100 * KV_MEMORY_FRACTION))
    return size


def serve_app(app, engine, host: str, port: int, state=None, shutdown_grace: float = 30.0) -> int:
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if state is not None and not state.draining:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if loop is not None:
                    log.info("shutting down: in-flight requests get up to %gs to finish", shutdown_grace)
                    loop.call_soon_threadsafe(state.begin_drain, shutdown_grace)
            super().handle_exit(sig, frame)

    engine.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=shutdown_grace + EXTRA_GRACE_S)
    server = _Server(config)
    log.info("serving on http://%s:%d (OpenAI API under /v1)", host, port)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers that is a no-op,
    # so a graceful SIGTERM ends in exit status 0 instead of death by signal
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        engine.shutdown()
        if state is not None:
            state.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not server.started:
        raise FmstackError(f"could not start the server on {host}:{port} (is the port in use?)")
    log.info("server stopped")
    return 0
