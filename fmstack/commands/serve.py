"""`fmstack serve`: the server's arguments; load the model, build the engine and the API, run it."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os

from fmstack.commands.common import add_model_args, load_from_args, want_compile
from fmstack.errors import FmstackError, ParameterError
from fmstack.serve.engine import WARMUP_CHOICES
from fmstack.serve.server import auto_kv_cache_bytes, serve_app

log = logging.getLogger("fmstack.serve.server")

HELP = "OpenAI-compatible HTTP server (continuous batching, paged KV cache)"


COMPILE_HELP = ("torch.compile the engine's steps (default: on): decode batches padded to power-of-two buckets, one "
                "graph each, plus one graph for prefill steps; kept in fmstack's compile cache, so only the first "
                "start compiles (see --warmup). --no-compile runs eager")


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p, compile_default=True, compile_help=COMPILE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $FMSTACK_API_KEY, "
                        "else none)")
    p.add_argument("--metrics-no-auth", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are ended (default 30.0)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: --model)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together (default 32)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per request (default: the model's context, at most 4096)")
    g.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="tokens per engine step; longer prompts are prefilled in chunks (default 256)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--kv-cache-mb", type=int, default=None,
                   help="KV cache size in MiB (default: enough for max-num-seqs full-length sequences, at most a "
                        "quarter of the available memory)")
    g.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the engine (default: torch's choice). On a busy shared machine "
                        "1 can be several times faster: OpenMP threads otherwise wait on each other at every op")
    g.add_argument("--speculative", default=None, metavar="ngram[:K]",
                   help="prompt-lookup speculative decoding: propose K tokens (default 4) found after the last "
                        "n-gram earlier in the request, verified in the same step; off by default (docs/serve.md)")
    g.add_argument("--speculative-max-batch", type=int, default=None,
                   help="no speculation while more than this many sequences run (default 32, measured: docs/serve.md)")
    g.add_argument("--warmup", choices=list(WARMUP_CHOICES), default="cached",
                   help="compiled engine, at startup: 'cached' compiles the prefill step and loads the decode buckets "
                        "already in the compile cache (the rest compile when first needed), 'all' compiles every "
                        "decode bucket too (the whole cold cost up front: about a minute per graph for SmolLM2-135M "
                        "on 2 CPU cores), 'none' compiles everything on first use (default cached)")
    g.add_argument("--max-body-kb", type=int, default=1024, help="largest request body in KiB (default 1024)")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError:
        raise FmstackError("fmstack serve needs fastapi and uvicorn: pip install -e '.[serve]'") from None
    from fmstack.serve.api import ServerState, build_app
    from fmstack.serve.engine import Engine, EngineConfig

    if args.parallel not in (None, "none"):
        raise ParameterError("--parallel is not supported by fmstack serve (one process serves one model)")
    if not 0 <= args.port <= 65535:
        raise ParameterError(f"--port {args.port} is invalid: must be in [0, 65535]")
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost":
            raise ParameterError(f"--host {args.host!r} is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)") from None
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_mb", "max_queue", "max_body_kb"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ParameterError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ParameterError(f"--threads {args.threads} is invalid: must be >= 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ParameterError(f"--max-model-len {args.max_model_len} is invalid: must be >= 2")
    if not (math.isfinite(args.shutdown_grace) and args.shutdown_grace >= 0):
        raise ParameterError(f"--shutdown-grace {args.shutdown_grace} is invalid: must be a number of seconds >= 0")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FMSTACK_API_KEY") or None
    if not is_loopback(args.host) and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model",
                    args.host)

    speculative = speculative_config(args)  # a bad --speculative fails before the model loads
    loaded = load_from_args(args)
    max_len = args.max_model_len or min(loaded.config.max_seq_len, 4096)
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        block_size=args.block_size, kv_cache_bytes=kv_cache_bytes(args, loaded.model, max_len),
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
        max_queue=args.max_queue, prefix_caching=not args.no_prefix_caching, compile=want_compile(args),
        sdpa_backend=args.sdpa_backend, threads=args.threads, speculative=speculative))
    engine.warm_up(args.warmup)
    state = ServerState(engine, loaded.tokenizer, args.served_model_name or args.model, api_key,
                        args.max_body_kb << 10, metrics_no_auth=args.metrics_no_auth)
    app = build_app(state)
    return serve_app(app, engine, args.host, args.port, state, args.shutdown_grace)


def speculative_config(args: argparse.Namespace):
    """--speculative / --speculative-max-batch -> a SpeculationConfig, or None (off)."""
    from fmstack.serve.speculation import DEFAULT_MAX_BATCH, parse_speculative

    max_batch = args.speculative_max_batch if args.speculative_max_batch is not None else DEFAULT_MAX_BATCH
    if max_batch < 1:
        raise ParameterError(f"--speculative-max-batch {max_batch} is invalid: must be >= 1")
    if args.speculative_max_batch is not None and args.speculative is None:
        raise ParameterError("--speculative-max-batch needs --speculative ngram[:K]")
    return parse_speculative(args.speculative, max_batch)


def is_loopback(host: str) -> bool:
    """True for 'localhost' and every loopback address (all of 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def kv_cache_bytes(args: argparse.Namespace, model, max_len: int) -> int:
    """--kv-cache-mb, or sized from the model and the available memory."""
    if args.kv_cache_mb is not None:
        return args.kv_cache_mb << 20
    return auto_kv_cache_bytes(model, args.block_size, args.max_num_seqs, max_len)
