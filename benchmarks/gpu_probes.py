"""The suite's measuring children (benchmarks/gpu_suite.py runs each as a stage, in its own process):

    python benchmarks/gpu_probes.py env OUT.json     versions, device properties, nvidia-smi
    python benchmarks/gpu_probes.py copy OUT.json    device copy bandwidth (the 100% line of utilization)
    python benchmarks/gpu_probes.py gemv OUT.json    one decode-shaped matmul per kernel

`--dry-run` runs each on the CPU with small shapes (the suite's CPU rehearsal): same code, no CUDA
graphs or events, host timers instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.stages import now_iso  # noqa: E402


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_probe(dev: torch.device) -> dict:
    """Versions (gguf too: `python -m fmstack` needs it), the device's properties, nvidia-smi."""
    env = {"date": now_iso(), "host": platform.node(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
           "transformers": version("transformers"), "gguf": version("gguf"), "pytest": version("pytest"),
           "cpu_count": os.cpu_count(), "device": str(dev)}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(device_name=torch.cuda.get_device_name(dev), capability=f"{p.major}.{p.minor}",
                   sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
                   device_count=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    else:
        env["device_name"] = f"{platform.machine()} CPU (ATen {torch.backends.cpu.get_cpu_capability()})"
    env["git_commit"] = run_text(["git", "rev-parse", "HEAD"]).strip() or None
    if dev.type == "cuda":
        env["nvidia_smi"] = [run_text(["nvidia-smi"]), run_text(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
             "clocks.max.mem,power.limit,temperature.gpu", "--format=csv"])]
    return env


def run_text(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
        return (r.stdout + r.stderr)[-3000:]
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]}: {e}"


class Timer:
    """Seconds of the work between start() and stop(): CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def copy_probe(dev: torch.device, n: int) -> dict:
    """dst.copy_(src) of n random bytes: (bytes read + written) / time, median of 20."""
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_()  # not zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    timer = Timer(dev)
    times = [timer.time(lambda: dst.copy_(src)) for _ in range(20)]
    ok = bool(torch.equal(src[:: 2**20], dst[:: 2**20]))
    gbs = [2 * n / t / 1e9 for t in times]
    return {"gb_s": round(statistics.median(gbs), 1), "min": round(min(gbs), 1), "max": round(max(gbs), 1),
            "bytes_each_way": n, "repeats": len(times), "copy_checked": ok,
            "method": f"dst.copy_(src), {n / 2**30:g} GiB uint8 random, (read + written bytes) / time, median"}


def gemv_probe(dev: torch.device, n: int, k: int, rotate_bytes: int) -> dict:
    """Time one decode-shaped matmul ([1, k] x [n, k]^T; llama2-7b's w_gate_up is n=22016, k=4096) per
    kernel, on CUDA inside a CUDA graph, rotating over weight copies of >= rotate_bytes (beyond L2);
    check each against bf16. The private torch uses (Inductor's config) stay in this benchmark child.
    One piece: the variants share the weights' makers and the timing loop."""
    from torch._inductor import config as inductor_config

    from fmstack.backends.kernels import int8pack_mm
    from fmstack.quant import ops
    from fmstack.quant.linear import dequantize_int4, int4_params, quantize_int4_with, quantize_int8

    group = 32
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)

    def base() -> torch.Tensor:
        return torch.randn(n, k, device=dev, generator=g) * 0.02

    def copies(make, each_bytes: int) -> tuple[list, torch.Tensor]:
        """(weight copies: enough to total >= rotate_bytes, at least 2, at most 32; the first copy's bf16
        dequantization)"""
        first, ref = make()
        return [first] + [make()[0] for _ in range(max(2, min(32, math.ceil(rotate_bytes / each_bytes))) - 1)], ref

    def bf16_w():
        w = base().to(torch.bfloat16)
        return (w,), w

    def int8_w():
        q, s = quantize_int8(base())
        s = s.to(torch.bfloat16)
        return (q, s), q.to(torch.bfloat16) * s[:, None]

    def int4_w():
        w = base()
        scales, zeros = int4_params(w, group)
        q = quantize_int4_with(w, scales, zeros, group)
        packed, sz = ops.int4_prepare(q, scales, zeros, torch.bfloat16)
        deq = dequantize_int4(q, sz[..., 0].T.float(), sz[..., 1].T.float(), group).to(torch.bfloat16)
        return (packed, sz), deq

    def fused_int8(x, q, s):
        return F.linear(x, q.to(x.dtype)) * s

    with inductor_config.patch(coordinate_descent_tuning=True):  # M=1 mm -> a fusable reduction
        fused = torch.compile(fused_int8, fullgraph=True)

    variants = {
        "bf16 F.linear (cuBLAS)": (bf16_w, n * k * 2, lambda w: F.linear(x, w)),
        "int8 aten._weight_int8pack_mm (native)": (int8_w, n * k + n * 2, lambda q, s: int8pack_mm(x, q, s)),
        "int8 fmstack ops.int8_mm, eager (F.linear + scales)": (int8_w, n * k + n * 2,
                                                               lambda q, s: ops.int8_mm(x, q, s)),
        "int8 Inductor reduction (coordinate_descent_tuning)": (int8_w, n * k + n * 2, lambda q, s: fused(x, q, s)),
        f"int4 g{group} aten._weight_int4pack_mm (fmstack)": (int4_w, n * k // 2 + (k // group) * n * 2 * 2,
                                                            lambda p, sz: ops.int4_mm(x, p, sz, group)),
    }
    out = {"shape": f"[1, {k}] x [{n}, {k}]^T", "variants": {}}
    for name, (make, nbytes, fn) in variants.items():
        try:
            ws, deq = copies(make, nbytes)
            with inductor_config.patch(coordinate_descent_tuning=True):
                for w in ws[:2]:
                    fn(*w)  # compile / warm up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ref = F.linear(x.float(), deq.float())
            err = ((fn(*ws[0]).float() - ref).norm() / ref.norm()).item()
            del deq
            times = time_rotation(dev, lambda: [fn(*w) for w in ws], len(ws))
            t = statistics.median(times)
            out["variants"][name] = {"us_per_call": round(t * 1e6, 2), "gb_s": round(nbytes / t / 1e9, 1),
                                     "bytes": nbytes, "copies": len(ws), "rel_err": err}
            del ws
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - one kernel failing is a result
            out["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(name, out["variants"][name], flush=True)
    return out


def time_rotation(dev: torch.device, calls, n_calls: int) -> list[float]:
    """Seconds per call of `calls()` (n_calls kernel calls), 20 samples: on CUDA, replays of one CUDA
    graph of them (no launch gaps); on CPU, plain calls."""
    timer = Timer(dev)
    if dev.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls()
        graph.replay()
        torch.cuda.synchronize()
        calls = graph.replay
    calls()
    return [timer.time(calls) / n_calls for _ in range(20)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_probes.py", description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=["env", "copy", "gemv"])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, small shapes")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_probes: error: CUDA is not available (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.dry_run else "cuda")
    if args.probe == "env":
        res = env_probe(dev)
    elif args.probe == "copy":
        res = copy_probe(dev, 2**26 if args.dry_run else 2**32)  # 4 GiB each way on CUDA: far beyond L2
    else:
        res = gemv_probe(dev, *((256, 512, 0) if args.dry_run else (22016, 4096, 2**30)))  # 1 GiB: far beyond L2
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


