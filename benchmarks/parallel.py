"""Decode speed of 1 rank vs N ranks (tensor and pipeline parallel).

Each configuration is its own job of `fmstack bench` (the decode benchmark, greedy, EOS ignored),
single-process or under `torchrun --nproc-per-node N ... --parallel tp|pp`; rank 0's numbers
are collected into one JSON (+ PNG). CPU jobs use gloo and `--threads-per-rank` threads per rank
(default: cores / N), and the single-process baseline runs both with all cores and with one rank's
share, so "2 ranks x 1 thread" can be read against "1 rank x 2 threads" and "1 rank x 1 thread".
CUDA jobs use NCCL, one GPU per rank.

    python -m benchmarks.parallel --model smollm2-135m-instruct \
        --out benchmarks/results/parallel_cpu.json --plot benchmarks/results/parallel_cpu.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from fmstack.bench.plot import write_outputs

log = logging.getLogger("benchmarks.parallel")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parallel", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, path or random:<config>")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--nproc", type=int, default=2, help="ranks of the parallel runs (default 2)")
    p.add_argument("--modes", default="tp,pp", help="comma list of parallel modes (default tp,pp)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads-per-rank", type=int, default=None, help="CPU: threads per rank (default cores / nproc)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile decode (default: on for CUDA, off for CPU)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job (default 1800)")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def run_job(args, name: str, nproc: int, mode: str, threads: int | None) -> dict:
    """One `fmstack bench` job; returns rank 0's report."""
    compile_flag = args.compile if args.compile is not None else args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        bench = ["bench", "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                 "--batch-sizes", str(args.batch_size), "--prompt-len", str(args.prompt_len),
                 "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--out", str(out),
                 "--compile" if compile_flag else "--no-compile"]
        env = dict(os.environ)
        if threads:
            bench += ["--threads", str(threads)]
            env["OMP_NUM_THREADS"] = str(threads)
        if mode == "none":
            cmd = [sys.executable, "-m", "fmstack", *bench]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "fmstack", *bench, "--parallel", mode]
        log.info("%s: %s", name, " ".join(cmd[1:]))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        report = json.loads(out.read_text())
    r = report["results"][0]
    return {"name": name, "ranks": nproc, "parallel": mode, "threads_per_rank": threads,
            "decode_tok_s": r["decode_tok_s"], "ms_per_step": r["ms_per_step"], "prefill_tok_s": r["prefill_tok_s"],
            "rank0_weight_bytes": report["systems"]["fmstack"]["weight_bytes"], "rank0_peak_mb": r["peak_mb"],
            "load_avg": [report["meta"]["load_avg_start"], report["meta"]["load_avg_end"]],
            "device_name": report["meta"]["device_name"], "torch": report["meta"]["torch"],
            "compile": compile_flag, "command": " ".join(cmd[2:])}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["runs"]
    med = [r["decode_tok_s"]["median"] for r in rows]
    err = [[m - r["decode_tok_s"]["min"] for m, r in zip(med, rows)],
           [r["decode_tok_s"]["max"] - m for m, r in zip(med, rows)]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.bar(range(len(rows)), med, yerr=err, capsize=4, color=["#888", "#bbb", "#4c72b0", "#dd8452"][:len(rows)])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], fontsize=8)
    ax.set_ylabel("decode tokens/s (median, min-max)")
    m = report["meta"]
    load = rows[0]["load_avg"][0]
    ax.set_title(f"{m['model']} {m['dtype']} batch {m['batch_size']}, {m['device_name'][:50]}\n"
                 f"torch {m['torch']}, compile={m['compile']}" + (f", load avg {load[0]:.1f}" if load else ""),
                 fontsize=9)
    for i, v in enumerate(med):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    cpu = not args.device.startswith("cuda")
    cores = os.cpu_count() or 1
    per_rank = args.threads_per_rank or max(1, cores // args.nproc)
    jobs = [(f"1 rank x {cores}t" if cpu else "1 rank", 1, "none", cores if cpu else None)]
    if cpu and per_rank != cores:
        jobs.append((f"1 rank x {per_rank}t", 1, "none", per_rank))
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        jobs.append((f"{mode} {args.nproc} ranks" + (f" x {per_rank}t" if cpu else ""), args.nproc, mode,
                     per_rank if cpu else None))
    runs = [run_job(args, *job) for job in jobs]
    for r in runs:
        t = r["decode_tok_s"]
        print(f"{r['name']:<22} decode {t['median']:8.2f} tok/s [{t['min']:.2f}-{t['max']:.2f}]  "
              f"{r['ms_per_step']['median']:8.1f} ms/step  rank-0 weights {r['rank0_weight_bytes'] / 2**20:.0f} MiB")
    report = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "host": platform.node(), "model": args.model, "device": args.device,
                 "device_name": runs[0]["device_name"], "torch": runs[0]["torch"], "dtype": args.dtype,
                 "batch_size": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "repeats": args.repeats, "compile": runs[0]["compile"], "cores": cores,
                 "backend": "nccl" if not cpu else "gloo", "command": "python -m benchmarks.parallel "
                 + " ".join(sys.argv[1:] if argv is None else argv)},
        "runs": runs,
    }
    write_outputs(report, args.out, args.plot, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
