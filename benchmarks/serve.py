"""Serving throughput and latency of `fmstack serve` under 1, 4, 16, 32 concurrent streaming clients.

Starts a live server (a subprocess on 127.0.0.1), warms it up, then for each concurrency level C runs
C client threads; each sends `--requests` streaming completions one after another (distinct prompts
of `--prompt-words` words, `--max-tokens` tokens each, ignore_eos so every request generates
the same count; the single client sends `--baseline-requests`, 3 by default). Per level: aggregate generated tokens/s (all tokens / wall time of the level),
time to first token (TTFT) and inter-token latency (ITL: gaps between streamed chunks) as p50 / p99,
and the ratio of aggregate throughput to the 1-client figure. Writes
benchmarks/results/serve_<device>.json and a PNG (matplotlib) next to it, with os.getloadavg() at
start and end: on a shared machine timings are noisy.

    python benchmarks/serve.py [--model smollm2-135m-instruct] [--levels 1 4 16 32] [--max-tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("river stone garden market window candle orange silver morning harbor forest lantern "
         "mountain letter violin meadow station thunder pocket island").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fmstack", "serve", "--model", args.model, "--port", str(port),
           "--max-num-seqs", str(max(args.levels)), "--max-model-len", str(args.max_model_len),
           "--device", args.device, "--dtype", args.dtype,
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--served-model-name", "bench"]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 600s")


def prompt(i: int, n_words: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n_words)) + f" #{i}:"


def one_request(url: str, text: str, max_tokens: int) -> dict:
    """Stream one completion; returns TTFT, chunk gaps and generated token count."""
    body = {"model": "bench", "prompt": text, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            if d.get("choices") and d["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": gaps, "tokens": tokens,
            "seconds": time.perf_counter() - t0}


def run_level(url: str, clients: int, requests: int, max_tokens: int, prompt_words: int, seed: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(requests):
            res = one_request(url, prompt(seed + c * requests + r, prompt_words), max_tokens)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    per_req = sorted(r["tokens"] / r["seconds"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "request_tokens_per_s_median": round(statistics.median(per_req), 3),
            "request_tokens_per_s_min": round(per_req[0], 3), "request_tokens_per_s_max": round(per_req[-1], 3),
            "ttft_p50_s": round(pct(ttft, 0.5), 4), "ttft_p99_s": round(pct(ttft, 0.99), 4),
            "itl_p50_s": round(pct(gaps, 0.5), 4), "itl_p99_s": round(pct(gaps, 0.99), 4),
            "itl_mean_s": round(statistics.fmean(gaps), 4) if gaps else None}


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install -e '.[bench]')")
        return
    levels = [r["clients"] for r in out["levels"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(levels, [r["tokens_per_s"] for r in out["levels"]], "o-")
    axes[0].set(xlabel="concurrent clients", ylabel="aggregate tokens/s", xscale="log", title="throughput")
    axes[1].plot(levels, [r["ttft_p50_s"] for r in out["levels"]], "o-", label="p50")
    axes[1].plot(levels, [r["ttft_p99_s"] for r in out["levels"]], "s--", label="p99")
    axes[1].set(xlabel="concurrent clients", ylabel="seconds", xscale="log", title="time to first token")
    axes[2].plot(levels, [r["itl_p50_s"] for r in out["levels"]], "o-", label="p50")
    axes[2].plot(levels, [r["itl_p99_s"] for r in out["levels"]], "s--", label="p99")
    axes[2].set(xlabel="concurrent clients", ylabel="seconds", xscale="log", title="inter-token latency")
    for ax in axes:
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.grid(alpha=0.3)
    axes[1].legend()
    axes[2].legend()
    fig.suptitle(f"fmstack serve, {out['model']} on {out['device']} (load avg {out['loadavg_start'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests", type=int, default=1, help="requests per client per level (default 1)")
    ap.add_argument("--baseline-requests", type=int, default=3,
                    help="requests the single client sends one after another (the baseline of every ratio; "
                         "several, as one request on a shared machine is noisy; default 3)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=24, help="words per prompt (~1.3 tokens each)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None,
                    help="server engine threads (--threads of fmstack serve; 1 on a busy shared machine)")
    ap.add_argument("--output", default=None, help="JSON path (default benchmarks/results/serve_<device>.json)")
    args = ap.parse_args()
    if any(c < 1 for c in args.levels) or args.requests < 1 or args.max_tokens < 2:
        raise SystemExit("--levels must be >= 1, --requests >= 1, --max-tokens >= 2")
    device = args.device.split(":")[0]
    out_path = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"serve_{device}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"fmstack_serve_bench_{port}.log"
    load_start = os.getloadavg()
    proc = start_server(args, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        run_level(url, min(4, max(args.levels)), 1, 4, args.prompt_words, seed=10_000)  # warm-up
        levels = []
        for c in args.levels:
            n_req = max(args.requests, args.baseline_requests) if c == 1 else args.requests
            r = run_level(url, c, n_req, args.max_tokens, args.prompt_words, seed=1000 * c)
            levels.append(r)
            print(f"  {c:>3} clients: {r['tokens_per_s']:.1f} tok/s", flush=True)
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
    base = levels[0]["tokens_per_s"] if levels and levels[0]["clients"] == 1 else None
    for r in levels:
        r["speedup_vs_1"] = round(r["tokens_per_s"] / base, 2) if base else None
    out = {"benchmark": "serve", "model": args.model, "device": args.device, "dtype": args.dtype,
           "quantize": args.quantize, "threads": args.threads, "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
           "requests_per_client": args.requests, "baseline_requests": args.baseline_requests, "max_num_batched_tokens": args.max_num_batched_tokens,
           "levels": levels, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
           "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
           "preemptions": [ln for ln in metrics.splitlines() if ln.startswith("fmstack_preemptions_total")],
           "note": "timings on a shared machine are noisy; compare ratios, see loadavg"}
    out_path.write_text(json.dumps(out, indent=2))
    print(f"\nfmstack serve  {args.model}  {args.device}/{args.dtype}  max_tokens={args.max_tokens}  "
          f"load avg {load_start[0]:.1f} -> {out['loadavg_end'][0]:.1f}")
    print(f"{'clients':>7} {'tok/s':>8} {'x 1-client':>10} {'per-request tok/s med [min-max]':>32} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for r in levels:
        sp = f"{r['speedup_vs_1']:.2f}" if r["speedup_vs_1"] is not None else "n/a"
        spread = (f"{r['request_tokens_per_s_median']:.2f} [{r['request_tokens_per_s_min']:.2f}-"
                  f"{r['request_tokens_per_s_max']:.2f}]")
        print(f"{r['clients']:>7} {r['tokens_per_s']:>8.1f} {sp:>10} {spread:>32} {r['ttft_p50_s']:>9.3f} "
              f"{r['ttft_p99_s']:>9.3f} {r['itl_p50_s']:>8.3f} {r['itl_p99_s']:>8.3f}")
    plot(out, out_path.with_suffix(".png"))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
