"""What every route shares: the engine, the tokenizer, settings, counters, the worker pool for
CPU-heavy request work, and the shutdown state (draining, grace deadline)."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from fmstack.serve.engine import Engine

T = TypeVar("T")

DEFAULT_WORKERS = 2  # threads for tokenization / chat templates / detokenization (the engine has its own)


@dataclass
class ServerState:
    """`api_key` guards every route but /health (and /metrics when `metrics_no_auth`)."""

    engine: Engine
    tokenizer: object | None
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    created: int = 0
    metrics_no_auth: bool = False
    workers: int = DEFAULT_WORKERS
    counts: Counter = field(default_factory=Counter)  # HTTP responses by status, for /metrics
    draining: bool = False  # shutting down: new requests get 503, running ones may finish
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    _stop: asyncio.Event | None = field(default=None, repr=False)
    _max_token_bytes: int | None = field(default=None, repr=False)

    def max_token_bytes(self) -> int:
        """Bytes of the vocabulary's longest token (computed once: ~0.4 s for SmolLM2's 49k tokens)."""
        if self._max_token_bytes is None:
            tok = self.tokenizer
            self._max_token_bytes = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
        return self._max_token_bytes

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="fmstack-http")
        return self._executor

    async def run_blocking(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the bounded worker pool so the event loop keeps answering (/health, streams)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @property
    def stop_event(self) -> asyncio.Event:
        """Set when the shutdown grace period is over: requests still running are ended."""
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    def begin_drain(self, grace_s: float) -> None:
        """Called on the event loop when SIGTERM arrives: refuse new requests, end the rest after `grace_s`."""
        self.draining = True
        asyncio.get_running_loop().call_later(grace_s, self.stop_event.set)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
