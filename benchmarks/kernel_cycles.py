"""Compute cost of the native block kernels, weights in cache: how many CPU cycles one decode call
(one row of x) spends per 16 weights, per activation mode. Where `quant_kernels.py` streams the whole
model from memory (what a token costs), this repeats one matrix that stays in the caches, so the figure
is the kernel's arithmetic, not the memory's: the exact mode's conversion work against the int8 mode's.

Cycles are wall time x the clock /proc/cpuinfo reports (nominal: a turbo or a throttled core moves
them) x threads. Each run is appended to --out under its label and git commit, so a before/after is
two runs of this script, e.g. the previous commit's library through PYTHONPATH:

    git worktree add /tmp/before HEAD~1
    PYTHONPATH=/tmp/before python benchmarks/kernel_cycles.py --label before --out benchmarks/results/kernel_cycles_cpu.json
    python benchmarks/kernel_cycles.py --label after --out benchmarks/results/kernel_cycles_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SHAPES = [(576, 576, 4), (3072, 576, 4), (576, 1536, 4), (49152, 576, 8)]  # (N, K, bits): SmolLM2's Q4_1 + Q8_0 head


def clock_mhz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    except OSError:
        pass
    return float("nan")


def make_weight(n: int, k: int, bits: int, gen: torch.Generator):
    from fmstack.quant.blocks import BlockWeight, pack_rows

    scales = (torch.rand(n, k // 32, generator=gen) * 0.01).half()
    if bits == 4:
        w = BlockWeight(torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8), scales, -8 * scales, 4, 32)
    else:
        w = BlockWeight(torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8), scales, None, 8, 32)
    return pack_rows(w)


def time_call(fn, seconds: float, repeats: int) -> float:
    """Median seconds per call over `repeats` timed loops of about `seconds` each."""
    fn()
    t = time.perf_counter()
    fn()
    calls = max(1, int(seconds / max(time.perf_counter() - t, 1e-7)))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t) / calls)
    return statistics.median(samples)


def measure(threads: int, repeats: int, isa: str) -> list[dict]:
    from fmstack import native

    assert native.available(), "the native kernels did not build"
    native.isa(isa)
    torch.set_num_threads(threads)
    gen, mhz, rows = torch.Generator().manual_seed(0), clock_mhz(), []
    op = torch.ops.fmstack.block_linear
    for n, k, bits in SHAPES:
        p = make_weight(n, k, bits, gen)
        x = torch.randn(1, k, generator=gen)
        for int8_act in (False, True):
            s = time_call(lambda x=x, p=p, b=bits, a=int8_act: op(x, p.qweight, p.scales, p.mins, b, 32, p.n, a),
                          0.2, repeats)
            rows.append({"isa": native.isa(), "n": n, "k": k, "bits": bits, "mode": "int8-act" if int8_act else "exact",
                         "us": round(s * 1e6, 2), "gweights_per_s": round(n * k / s / 1e9, 2),
                         "cycles_per_16_weights": round(s * mhz * 1e6 * threads / (n * k / 16), 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="run")
    ap.add_argument("--isas", default="avx512vnni,avx2", help="code paths to time (clamped to this CPU's)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from fmstack import native

    rows = [r for isa in args.isas.split(",") for r in measure(args.threads, args.repeats, isa)]
    root = Path(native.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, check=False,
                            text=True).stdout.strip()
    run = {"label": args.label, "commit": commit, "library": str(root),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
           "clock_mhz": clock_mhz(), "load_avg": os.getloadavg(), "rows": rows}
    for r in rows:
        print(f"{r['isa']:10s} {r['n']:6d} x {r['k']:4d} Q{r['bits']} {r['mode']:8s} {r['us']:9.1f} us  "
              f"{r['cycles_per_16_weights']:.2f} cycles / 16 weights")
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "kernel_cycles", "runs": []}
        old["runs"].append(run)
        args.out.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
