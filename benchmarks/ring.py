"""Context parallel (ring attention) vs single-process attention: prefill latency, per-token decode
latency and KV memory per rank vs sequence length.

Each configuration is one job running this module's worker: single-process (all cores, and one
rank's share of them) or `torchrun --nproc-per-node N ... --parallel cp` (gloo on CPU, one thread
per rank by default). For each length L the worker prefills a random L-token prompt through a fresh
cache (`--repeats` times), then decodes `--new-tokens` greedy tokens one at a time, and reports the
median and min/max. The CP worker also times gathering the whole KV cache to every rank (the
alternative to decoding from the sharded cache). Memory: KV-cache bytes per rank (exact buffer
sizes) and the process's peak RSS (monotone over the job). The JSON records `os.getloadavg()`
before and after each job: the CPU machine is shared, so timings under load are noisy.

    python -m benchmarks.ring --lengths 256,512,1024,2048,4096 \
        --out benchmarks/results/ring_cpu.json --plot benchmarks/results/ring_cpu.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fmstack.bench.plot import write_outputs

log = logging.getLogger("benchmarks.ring")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ring", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, path or random:<config>")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--lengths", default="256,512,1024,2048,4096", help="comma list of prompt lengths")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the ring (default 2)")
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps timed per length (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="prefills timed per length (default 2)")
    p.add_argument("--threads-per-rank", type=int, default=None, help="CPU threads per rank (default cores / nproc)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def worker(args: argparse.Namespace) -> None:
    """One configuration: times prefill and decode for every length; rank 0 writes the JSON."""
    import torch
    import torch.distributed as dist

    from fmstack.generation.kv_cache import StaticKVCache
    from fmstack.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cp = args.parallel == "cp"
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, parallel=args.parallel if cp else None)
    model, cfg = loaded.model, loaded.config
    dev = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if cp else (0, 1)
    sync = dist.barrier if cp else (lambda: None)
    rows = []
    with torch.inference_mode():  # warm-up: one-time allocations and kernel selection stay out of the timings
        wc = model.make_cache(1, 64, dtype=torch.float32, device=dev) if cp else StaticKVCache(cfg, 1, 64, device=dev)
        warm = torch.arange(32, device=dev)[None]
        nxt = model(warm, warm, wc, last_only=True)[:, -1].argmax(-1, keepdim=True)
        model(nxt, torch.tensor([[32]], device=dev), wc)
        del wc
    for L in [int(x) for x in args.lengths.split(",")]:
        S = L + args.new_tokens
        g = torch.Generator().manual_seed(L)
        tokens = torch.randint(0, cfg.vocab_size, (1, L), generator=g).to(dev)
        positions = torch.arange(L, device=dev)[None]
        cache = model.make_cache(1, S, dtype=torch.float32, device=dev) if cp else StaticKVCache(cfg, 1, S, device=dev)
        prefill, decode = [], []
        with torch.inference_mode():
            for _ in range(args.repeats):
                cache.reset()
                sync()
                t0 = time.perf_counter()
                logits = model(tokens, positions, cache, last_only=True)
                prefill.append(time.perf_counter() - t0)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            for i in range(args.new_tokens):
                sync()
                t0 = time.perf_counter()
                logits = model(nxt, torch.tensor([[L + i]], device=dev), cache)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                decode.append(time.perf_counter() - t0)
            gather_s = None
            if cp:  # the alternative: gather every rank's KV shard to every rank, then decode locally
                sync()
                t0 = time.perf_counter()
                for b in [cache.layer_kv(i) for i in range(cfg.n_layers)]:
                    for t in b:
                        parts = [torch.empty_like(t) for _ in range(world)]
                        dist.all_gather(parts, t.contiguous())
                gather_s = time.perf_counter() - t0
        kv_bytes = cache.nbytes
        full_kv = 2 * cfg.n_layers * cfg.n_kv_heads * S * cfg.head_dim * 4
        row = {"length": L, "prefill_s": _stats(prefill), "decode_ms": _stats([1e3 * d for d in decode]),
               "kv_bytes_rank": kv_bytes, "kv_bytes_full": full_kv,
               "kv_gather_s": gather_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if cp:
            per_rank = [None] * world
            dist.all_gather_object(per_rank, {"kv_bytes": kv_bytes, "fill": cache.fill,
                                              "peak_rss_mb": row["peak_rss_mb"]})
            row["ranks"] = per_rank
        rows.append(row)
        log.info("L=%d prefill %.3fs decode %.1f ms/token kv %.1f MiB/rank", L, row["prefill_s"]["median"],
                 row["decode_ms"]["median"], kv_bytes / 2**20)
        del cache
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                                     "threads": torch.get_num_threads()}))
    if cp:
        dist.barrier()
        dist.destroy_process_group()


def run_job(args, name: str, nproc: int, mode: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w.json"
        wargs = ["--worker", "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                 "--lengths", args.lengths, "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                 "--threads", str(threads), "--parallel", mode, "--worker-out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        if mode == "none":
            cmd = [sys.executable, "-m", "benchmarks.ring", *wargs]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "benchmarks.ring", *wargs]
        log.info("%s: %s", name, " ".join(cmd[1:]))
        load0 = os.getloadavg()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        rep = json.loads(out.read_text())
    return {"name": name, "ranks": nproc, "parallel": mode, "threads_per_rank": threads, "rows": rep["rows"],
            "torch": rep["torch"], "load_avg": [list(load0), list(os.getloadavg())], "command": " ".join(cmd[2:])}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    for run in report["runs"]:
        Ls = [r["length"] for r in run["rows"]]
        for ax, key, scale in [(axes[0], "prefill_s", 1.0), (axes[1], "decode_ms", 1.0)]:
            med = [r[key]["median"] * scale for r in run["rows"]]
            lo = [m - r[key]["min"] * scale for m, r in zip(med, run["rows"])]
            hi = [r[key]["max"] * scale - m for m, r in zip(med, run["rows"])]
            ax.errorbar(Ls, med, yerr=[lo, hi], marker="o", capsize=3, label=run["name"])
        axes[2].plot(Ls, [r["kv_bytes_rank"] / 2**20 for r in run["rows"]], marker="o", label=run["name"])
    axes[0].set_ylabel("prefill latency (s, median, min-max)")
    axes[1].set_ylabel("decode latency (ms/token, median, min-max)")
    axes[2].set_ylabel("KV cache per rank (MiB)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    m = report["meta"]
    load = report["runs"][0]["load_avg"][0][0]
    fig.suptitle(f"ring attention (--parallel cp) vs single process: {m['model']} {m['dtype']}, {m['cores']} CPU "
                 f"cores shared, torch {report['runs'][0]['torch']}, load avg {load:.1f} at start (noisy)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.worker:
        worker(args)
        return 0
    cores = os.cpu_count() or 1
    per_rank = args.threads_per_rank or max(1, cores // args.nproc)
    jobs = [(f"1 process x {cores}t", 1, "none", cores)]
    if per_rank != cores:
        jobs.append((f"1 process x {per_rank}t", 1, "none", per_rank))
    jobs.append((f"ring {args.nproc} ranks x {per_rank}t", args.nproc, "cp", per_rank))
    runs = [run_job(args, *job) for job in jobs]
    print(f"{'config':<24}{'L':>6}{'prefill s':>11}{'[min-max]':>17}{'decode ms':>11}{'[min-max]':>17}"
          f"{'KV MiB/rank':>12}{'gather KV s':>12}")
    for run in runs:
        for r in run["rows"]:
            p, d = r["prefill_s"], r["decode_ms"]
            g = f"{r['kv_gather_s']:.3f}" if r["kv_gather_s"] is not None else "-"
            p_rng, d_rng = f"[{p['min']:.3f}-{p['max']:.3f}]", f"[{d['min']:.1f}-{d['max']:.1f}]"
            print(f"{run['name']:<24}{r['length']:>6}{p['median']:>11.3f}{p_rng:>17}{d['median']:>11.1f}{d_rng:>17}"
                  f"{r['kv_bytes_rank'] / 2**20:>12.1f}{g:>12}")
    ring = runs[-1]
    ratios = []  # ring over each single-process configuration, per length (medians)
    for single in runs[:-1]:
        base = {r["length"]: r for r in single["rows"]}
        for r in ring["rows"]:
            b = base[r["length"]]
            x = {"vs": single["name"], "length": r["length"],
                 "prefill_ring_over_single": r["prefill_s"]["median"] / b["prefill_s"]["median"],
                 "decode_ring_over_single": r["decode_ms"]["median"] / b["decode_ms"]["median"],
                 "kv_rank_over_full": r["kv_bytes_rank"] / r["kv_bytes_full"]}
            ratios.append(x)
            print(f"L={x['length']:>5} vs {single['name']}: ring/single prefill "
                  f"x{x['prefill_ring_over_single']:.2f}, decode x{x['decode_ring_over_single']:.2f}, "
                  f"KV per rank {100 * x['kv_rank_over_full']:.0f}% of full")
    report = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "host": platform.node(), "model": args.model, "device": args.device, "dtype": args.dtype,
                 "lengths": args.lengths, "new_tokens": args.new_tokens, "repeats": args.repeats, "cores": cores,
                 "backend": "gloo", "note": "shared CPU machine: timings under load are noisy (see load_avg)",
                 "command": "python -m benchmarks.ring " + " ".join(sys.argv[1:] if argv is None else argv)},
        "runs": runs, "ratios": ratios,
    }
    write_outputs(report, args.out, args.plot, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
