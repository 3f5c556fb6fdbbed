"""Prometheus text exposition (format 0.0.4) of the engine's state and counters."""

from __future__ import annotations

from collections import Counter

from fmstack.serve.engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _line(out: list[str], name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
    out.append(f"# HELP {name} {help}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")


def render(stats: EngineStats, model: str, http_responses: Counter) -> str:
    """The /metrics page: gauges for queues and KV blocks, counters for tokens, requests, preemptions."""
    lbl = f'{{model_name="{model}"}}'
    out: list[str] = []
    _line(out, "fmstack_num_requests_running", "gauge", "Requests in the running batch.", [(lbl, stats.running)])
    _line(out, "fmstack_num_requests_waiting", "gauge", "Requests waiting to be scheduled.", [(lbl, stats.waiting)])
    _line(out, "fmstack_kv_blocks_used", "gauge", "KV cache blocks held by requests.", [(lbl, stats.blocks_used)])
    _line(out, "fmstack_kv_blocks_free", "gauge", "KV cache blocks free (including cached prefixes).",
          [(lbl, stats.blocks_free)])
    _line(out, "fmstack_kv_blocks_total", "gauge", "KV cache blocks in all.", [(lbl, stats.blocks_total)])
    usage = stats.blocks_used / stats.blocks_total if stats.blocks_total else 0.0
    _line(out, "fmstack_kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use.", [(lbl, float(usage))])
    _line(out, "fmstack_prompt_tokens_total", "counter", "Prompt tokens received.", [(lbl, stats.prompt_tokens)])
    _line(out, "fmstack_generation_tokens_total", "counter", "Tokens generated.", [(lbl, stats.generation_tokens)])
    _line(out, "fmstack_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
          [(lbl, stats.prefix_cache_hit_tokens)])
    _line(out, "fmstack_preemptions_total", "counter", "Sequences preempted (recomputed later).",
          [(lbl, stats.preemptions)])
    _line(out, "fmstack_engine_steps_total", "counter", "Engine steps run.", [(lbl, stats.steps)])
    _line(out, "fmstack_request_finished_total", "counter", "Finished requests by finish reason.",
          [(f'{{model_name="{model}",finish_reason="{r}"}}', n) for r, n in sorted(stats.finished.items())])
    _line(out, "fmstack_http_responses_total", "counter", "HTTP responses by status code.",
          [(f'{{status="{code}"}}', n) for code, n in sorted(http_responses.items())])
    return "\n".join(out) + "\n"
