"""`fmstack serve` (eager and compiled) against llama.cpp's `llama-server` under 1 and 16 concurrent
clients, loopback only: the figures of the server comparison in the README.

Each server is started on 127.0.0.1 (a free port), warmed (one pass of every concurrency level with
a few tokens, so no compile or first-touch cost lands in the timing), then each level runs C client
threads at once, each streaming one `--max-tokens` completion (ignore_eos: every request generates
the same count). Per level: aggregate tok/s (all tokens / wall time), per-client tok/s (median of
tokens / request time, TTFT included) and TTFT p50/p99. The compiled server starts with
`--warmup all`; its start-up seconds (the cold compile, or loading from fmstack's compile cache)
are recorded. llama-server runs only with `--llama-server PATH` (same GGUF, `-np` = the largest
level, `--threads` threads); build it as the README says, outside the repository.
`--bare-step` adds `fmstack bench --batch-sizes 1,16` (the decode step without a server, batch 1: what
`fmstack generate` decodes at, one client's ceiling; batch 16: the 16-client figure's ceiling). Writes benchmarks/results/serve_load_cpu.json with the load
average at start and end: on a shared machine every figure is an upper bound on the time taken.

    python -m benchmarks.serve_load [--modes eager compiled] [--llama-server /tmp/llama-server] [--bare-step]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve import free_port, run_level

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> float:
    """Seconds until `url`/health answers 200 (the server's start-up, compiles included)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start in {timeout_s:.0f}s; see {log_path}")


def fmstack_cmd(args, port: int, compiled: bool) -> list[str]:
    cmd = [sys.executable, "-m", "fmstack", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
           "--max-num-seqs", str(max(args.clients)), "--max-model-len", str(args.max_model_len),
           "--served-model-name", "bench", "--compile" if compiled else "--no-compile"]
    if compiled:
        cmd += ["--warmup", "all"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def llama_cmd(args, port: int) -> list[str]:
    from fmstack.checkpoints.named import resolve_model_path

    n = max(args.clients)
    return [args.llama_server, "-m", str(resolve_model_path(args.model)), "--host", HOST, "--port", str(port),
            "-np", str(n), "-c", str(n * args.max_model_len), "-t", str(args.threads or os.cpu_count()),
            "--no-webui", "--no-repack"]  # its AMX repack dies with SIGILL where the hypervisor withholds the
                                          # AMX tile state (this project's Intel VM); the VNNI kernels run


def measure(name: str, cmd: list[str], args) -> dict:
    """Start one server, warm it, time every level, stop it."""
    port = int(cmd[cmd.index("--port") + 1])
    url = f"http://{HOST}:{port}"
    log_path = Path(tempfile.gettempdir()) / f"serve_load_{name}_{port}.log"
    print(f"{name}: starting ({' '.join(cmd)})", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        startup = wait_healthy(proc, url, log_path, args.startup_timeout)
        for c in sorted(set(args.clients)):
            run_level(url, c, 1, 4, args.prompt_words, seed=10_000 + c)
        levels = []
        for c in args.clients:
            r = run_level(url, c, 1, args.max_tokens, args.prompt_words, seed=1000 * c)
            print(f"{name}: {c:>3} clients {r['tokens_per_s']:.1f} tok/s aggregate, "
                  f"{r['request_tokens_per_s_median']:.1f} per client", file=sys.stderr, flush=True)
            levels.append(r)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"server": name, "command": cmd, "startup_s": round(startup, 1), "levels": levels,
            "log": str(log_path)}


def bare_step(args) -> dict:
    """`fmstack bench --batch-sizes 1,N --compile` in the same run: the decode step alone at batch 1 (what
    `fmstack generate` decodes at: one client's ceiling) and at the largest level (N clients' ceiling)."""
    n = max(args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.json"
        # --quantize gguf: what `fmstack serve` runs a quantized GGUF as on CPU by default (its blocks);
        # bench's own default is the fp32 baseline
        cmd = [sys.executable, "-m", "fmstack", "bench", "--model", args.model, "--compile", "--quantize", "gguf",
               "--batch-sizes", f"1,{n}" if n > 1 else "1", "--new-tokens", str(args.max_tokens), "--repeats", "3",
               "--out", str(path)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"bare step: {' '.join(cmd)}", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        results = json.loads(path.read_text())["results"] if out.returncode == 0 else []
    return {"command": cmd, "returncode": out.returncode, "stderr": out.stderr[-2000:],
            "decode_tok_s": {str(r["batch_size"]): r["decode_tok_s"]["median"] for r in results},
            "ms_per_step": {str(r["batch_size"]): r["ms_per_step"]["median"] for r in results}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=24, help="words per prompt (~1.3 tokens each)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="server threads (both servers; default: all cores)")
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary to compare against")
    ap.add_argument("--bare-step", action="store_true", help="also run fmstack bench at the largest level")
    ap.add_argument("--startup-timeout", type=float, default=3600.0, help="seconds a server may take to start")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_load_cpu.json"))
    args = ap.parse_args()
    if any(c < 1 for c in args.clients) or args.max_tokens < 2:
        raise SystemExit("--clients must be >= 1 and --max-tokens >= 2")
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        raise SystemExit(f"--llama-server {args.llama_server}: not an executable file")
    load_start = os.getloadavg()
    runs: list[dict] = []
    out = {"benchmark": "serve_load", "model": args.model, "max_tokens": args.max_tokens,
           "prompt_words": args.prompt_words, "threads": args.threads, "runs": runs, "bare_step": None,
           "loadavg_start": load_start, "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "note": "shared machine: figures are upper bounds on time, see loadavg"}
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    servers = [(f"fmstack-{m}", lambda m=m: fmstack_cmd(args, free_port(), m == "compiled")) for m in args.modes]
    if args.llama_server:
        servers.append(("llama-server", lambda: llama_cmd(args, free_port())))
    for name, cmd in servers:  # the JSON is rewritten after each server: an interrupted run keeps what it measured
        runs.append(measure(name, cmd(), args))
        out["loadavg_end"] = os.getloadavg()
        path.write_text(json.dumps(out, indent=2))
    if args.bare_step:
        out["bare_step"] = bare_step(args)
        out["loadavg_end"] = os.getloadavg()
        path.write_text(json.dumps(out, indent=2))
    print(f"{'server':<18} {'clients':>7} {'agg tok/s':>10} {'per client':>10} {'TTFT p50':>9} {'start s':>8}")
    for run in runs:
        for r in run["levels"]:
            print(f"{run['server']:<18} {r['clients']:>7} {r['tokens_per_s']:>10.1f} "
                  f"{r['request_tokens_per_s_median']:>10.2f} {r['ttft_p50_s']:>9.3f} {run['startup_s']:>8.1f}")
    print(f"load avg {load_start[0]:.1f} -> {out['loadavg_end'][0]:.1f}; wrote {path}")


if __name__ == "__main__":
    main()
