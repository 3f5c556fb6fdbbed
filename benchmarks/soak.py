"""Soak test of `fmstack serve`, and the event-loop blocking probe. Loopback only, bounded in time and
request count, stops by itself.

Soak (default): starts a server subprocess on 127.0.0.1 and runs `--clients` threads for
`--duration` seconds (at most `--max-requests` requests in all). Each client loops: a streaming
completion that it reads to the end, or (with probability `--disconnect-rate`) drops after a few
events, or (probability `--hostile-rate`) a hostile request from HOSTILE, which must get its 4xx.
At the end, once the engine is idle: KV blocks still used (/metrics: leaked blocks), the server's
RSS drift (VmRSS after warm-up vs at the end), request latency p50 / p99 of completed streams, and
failures split into client disconnects (deliberate) and real failures (5xx, wrong status, transport
errors, a stream without [DONE]).

Blocking probe (`--blocking`): one thread sends `--big-requests` bodies of ~1 MB (a text prompt if
the model has a tokenizer, token ids otherwise; each is refused as over-long, after being parsed and
tokenized; or to /tokenize with `--big-route`, which tokenizes all of it) while another polls
/health every 10 ms; reports /health latency p50 / p99 / max with and
without the big requests. `--repo DIR` serves the fmstack of another checkout (before/after
comparisons).

    python benchmarks/soak.py --model random:tiny-gqa --clients 4 --duration 30
    python benchmarks/soak.py --blocking --model CKPT [--repo /path/to/other/checkout]

Writes benchmarks/results/soak_cpu.json (or serve_blocking_cpu.json), with os.getloadavg().
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

HOSTILE = [  # (raw body, expected status)
    (b'{"prompt": ', 400),
    (b'{"prompt": [1, 2], "max_tokens": 4, "temperature": 1, "top_k": 18446744073709551616}', 400),
    (b'{"prompt": [1, 2], "max_tokens": ' + b"9" * 5000 + b"}", 400),
    (b'{"prompt": "\\ud800", "max_tokens": 2}', 400),
    (b'{"prompt": [1, 2], "stop": ["\\udfff"]}', 400),
    (b'{"prompt": [1, 2], "temperature": 1e999}', 400),
    (b'{"prompt": [1, 2], "top_p": 1e-60, "temperature": 1}', 400),
    (b'{"prompt": [1, 2], "max_tokens": 100000}', 400),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (b"[]", 400),
    (b'{"prompt": [1, 2], "n": 65}', 400),  # n x prompts > 64
    (b'{"prompt": [1, 2], "presence_penalty": 2.5}', 400),
    (b'{"prompt": [1, 2], "logit_bias": {"99999999": 5}}', 400),
    (b'{"prompt": [1, 2], "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}', 400),
    (b'{"model": "other", "prompt": [1]}', 404),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    """The server subprocess on 127.0.0.1 and its URL, once /health answers."""
    port = _port()
    cmd = [sys.executable, "-m", "fmstack", "serve", "--host", "127.0.0.1", "--port", str(port), "--model",
           args.model, "--served-model-name", "soak", "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(args.clients), "--threads", "1", "--kv-cache-mb", "16"]
    env = dict(os.environ, PYTHONPATH=str(Path(args.repo).resolve()), TOKENIZERS_PARALLELISM="false")
    # cwd too: `python -m` puts the working directory before PYTHONPATH on sys.path
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=args.repo)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server did not come up; see {log_path}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 4)


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.completed = self.disconnects = self.hostile_ok = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []

    def add(self, **kw) -> None:
        with self.lock:
            self.requests += 1
            for k, v in kw.items():
                if k == "failure":
                    self.failures.append(v)
                elif k == "latency":
                    self.latencies.append(v)
                    self.completed += 1
                else:
                    setattr(self, k, getattr(self, k) + v)


def one_stream(c: httpx.Client, rng: random.Random, tally: Tally, drop: bool) -> None:
    body = {"prompt": [rng.randrange(1, 200) for _ in range(rng.randrange(1, 40))],
            "max_tokens": rng.randrange(1, 64), "temperature": rng.choice([0, 0.8]), "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return tally.add(failure=f"stream status {r.status_code}: {r.read()[:200]!r}")
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if drop and len(lines) >= 2:
                return tally.add(disconnects=1)  # leaving the block closes the connection mid-stream
    if not lines or lines[-1] != "data: [DONE]" or any('"error"' in ln for ln in lines):
        return tally.add(failure=f"stream ended badly: {lines[-2:]}")
    tally.add(latency=time.perf_counter() - t0)


def client(url: str, args, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline and tally.requests < args.max_requests:
        # a new connection per request: a dropped stream leaves its connection unusable
        with httpx.Client(base_url=url, timeout=120) as c:
            try:
                if rng.random() < args.hostile_rate:
                    raw, status = rng.choice(HOSTILE)
                    r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
                    ok = r.status_code == status and "error" in r.json()
                    tally.add(**({"hostile_ok": 1} if ok else {"failure": f"hostile got {r.status_code}"}))
                else:
                    one_stream(c, rng, tally, drop=rng.random() < args.disconnect_rate)
            except (httpx.HTTPError, ValueError) as e:
                tally.add(failure=f"transport: {e!r}")


def wait_idle(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "fmstack_num_requests_running") == 0 and metric(url, "fmstack_num_requests_waiting") == 0:
            return
        time.sleep(0.2)


def soak(args, proc: subprocess.Popen, url: str) -> dict:
    warm = Tally()
    client(url, argparse.Namespace(**{**vars(args), "hostile_rate": 0, "disconnect_rate": 0, "max_requests": 4}),
           0, time.monotonic() + 60, warm)
    rss0, tally = rss_mib(proc.pid), Tally()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, args, i + 1, t0 + args.duration, tally))
               for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    wait_idle(url)
    return {"requests": tally.requests, "completed_streams": tally.completed, "hostile_answered_ok": tally.hostile_ok,
            "disconnects": tally.disconnects, "real_failures": len(tally.failures),
            "failure_samples": tally.failures[:10],
            "failure_kinds": dict(collections.Counter(tally.failures)), "leaked_blocks": metric(url, "fmstack_kv_blocks_used"),
            "rss_mib_start": round(rss0, 1), "rss_mib_end": round(rss_mib(proc.pid), 1),
            "rss_drift_mib": round(rss_mib(proc.pid) - rss0, 1), "wall_s": round(wall, 1),
            "latency_p50_s": pct(tally.latencies, 0.5), "latency_p99_s": pct(tally.latencies, 0.99),
            "server_alive": proc.poll() is None}


def probe_health(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.get("/health")
            out.append(time.perf_counter() - t)
            time.sleep(0.01)


def big_body(url: str, route: str) -> bytes:
    """~1 MB (under the default 1 MiB limit): text if the server tokenizes, else token ids."""
    has_tok = httpx.get(url + "/tokenizer_info", timeout=10).status_code == 200
    extra = {} if route == "/tokenize" else {"max_tokens": 1}
    if has_tok:
        return json.dumps({"prompt": "lorem ipsum dolor " * 55_000, **extra}).encode()
    return json.dumps({"prompt": [7] * 330_000, **extra}).encode()


def blocking(args, url: str) -> dict:
    """/health latency alone, then while big requests arrive one after another."""
    body, res = big_body(url, args.big_route), {"big_route": args.big_route}
    for phase in ("idle", "big_requests"):
        lat: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=probe_health, args=(url, stop, lat))
        t.start()
        statuses = []
        if phase == "idle":
            time.sleep(3)
        else:
            with httpx.Client(base_url=url, timeout=120) as c:
                for _ in range(args.big_requests):
                    statuses.append(c.post(args.big_route, content=body,
                                           headers={"content-type": "application/json"}).status_code)
        stop.set()
        t.join()
        res[phase] = {"health_probes": len(lat), "p50_ms": round(1e3 * pct(lat, 0.5), 2),
                      "p99_ms": round(1e3 * pct(lat, 0.99), 2), "max_ms": round(1e3 * max(lat), 2),
                      "big_request_statuses": sorted(set(statuses)), "body_bytes": len(body)}
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:tiny-gqa")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--disconnect-rate", type=float, default=0.2)
    p.add_argument("--hostile-rate", type=float, default=0.2)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--blocking", action="store_true", help="the /health-under-1MB-requests probe instead")
    p.add_argument("--big-requests", type=int, default=20)
    p.add_argument("--big-route", default="/v1/completions", choices=["/v1/completions", "/tokenize"],
                   help="where the big bodies go (/tokenize has no length limit: the whole text is tokenized)")
    p.add_argument("--repo", default=str(ROOT), help="checkout whose fmstack the server runs (default: this one)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    log_path = Path(tempfile.mkdtemp()) / "server.log"
    load0 = os.getloadavg()
    proc, url = launch(args, log_path)
    try:
        result = blocking(args, url) if args.blocking else soak(args, proc, url)
    finally:
        proc.terminate()
        exit_code = proc.wait(60)
    result = {"model": args.model, "clients": args.clients, "duration_s": args.duration, "repo": args.repo,
              **result, "server_exit_code": exit_code, "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    name = "serve_blocking_cpu.json" if args.blocking else "soak_cpu.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
