"""CPU weight-only matmul kernels on SmolLM2-135M's projection shapes: which kernel `fmstack.quant.ops`
should pick for one row (batch-1 decode) and for many rows (prefill).

Per kernel and row count M it times all 30 layers' projections (wqkv, wo, w_gate_up, w_down: 106M
weights, so nothing stays in the 32 MB L3) and reports ms per pass, G weights/s and the weight bytes
streamed per second. Kernels:

  fp32 BLAS              F.linear on fp32 weights (the unquantized baseline)
  fp32 reduction         fmstack.generation.compile.gemv_as_reduction, compiled (the CPU decode lowering)
  int8 native            aten._weight_int8pack_mm
  int8 fmstack eager     ops.int8_mm outside torch.compile
  int8 fmstack compiled  ops.int8_mm inside torch.compile (M <= ops.REDUCTION_MAX_ROWS: the fused reduction)
  int4 native            aten._weight_int4pack_mm_for_cpu (tinygemm-style CPU packing)
  int4 fmstack eager     ops.int4_mm on the group-planar layout outside torch.compile
  int4 fmstack compiled  the same inside torch.compile (M <= ops.REDUCTION_MAX_ROWS: the fused reduction)

Timings of the kernels are interleaved per repeat; medians with [min-max].

    python benchmarks/quant_kernels.py --rows 1,2,4,8,16,128 --threads 2 --out benchmarks/results/quant_kernels_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmstack.quant import QuantSpec, ops, rtn_portable  # noqa: E402
from fmstack.quant.linear import Int4Linear, Int8Linear, quantize_int8  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) per layer
LAYERS = 30


def build(group_size: int):
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=g) * 0.02
            q8, s8 = quantize_int8(w)
            t4 = rtn_portable(w, QuantSpec("int4", group_size))
            native4 = None
            if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                q4 = ops.unpack_uint4(t4["qweight"]).to(torch.int32)
                sz = torch.stack([t4["scales"], t4["zeros"]], -1).transpose(0, 1).contiguous()
                native4 = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 2), sz)
            layers.append({
                "k": k, "fp32": w, "int8": Int8Linear.from_portable(q8, s8, torch.float32), "q8": (q8, s8),
                "int4": Int4Linear.from_portable(t4["qweight"], t4["scales"], t4["zeros"], group_size, torch.float32),
                "native4": native4,
            })
    return layers


def kernels(layers, group_size: int) -> dict:
    aten = torch.ops.aten

    def over_layers(fn):
        def run(xs):
            for layer in layers:
                fn(layer, xs[layer["k"]])
        return run

    from fmstack.backends import gemv_as_reduction

    fp32_reduce = torch.compile(lambda w, x: gemv_as_reduction(x, w.T, max_rows=x.shape[0]), fullgraph=True,
                                dynamic=False)
    compiled8 = torch.compile(lambda lin, x: lin(x), fullgraph=True, dynamic=False)
    compiled4 = torch.compile(lambda lin, x: lin(x), fullgraph=True, dynamic=False)
    ks = {
        "fp32 BLAS": (4.0, over_layers(lambda l, x: F.linear(x, l["fp32"]))),
        "fp32 reduction": (4.0, over_layers(lambda l, x: fp32_reduce(l["fp32"], x))),
        "int8 native": (1.0, over_layers(lambda l, x: aten._weight_int8pack_mm(x, *l["q8"]))),
        "int8 fmstack eager": (1.0, over_layers(lambda l, x: l["int8"](x))),
        "int8 fmstack compiled": (1.0, over_layers(lambda l, x: compiled8(l["int8"], x))),
        "int4 fmstack eager": (0.5 + 8 / group_size, over_layers(lambda l, x: l["int4"](x))),
        "int4 fmstack compiled": (0.5 + 8 / group_size, over_layers(lambda l, x: compiled4(l["int4"], x))),
    }
    if layers[0]["native4"] is not None:
        ks["int4 native"] = (0.5 + 8 / group_size, over_layers(
            lambda l, x: aten._weight_int4pack_mm_for_cpu(x, l["native4"][0], group_size, l["native4"][1])))
    return ks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,128", help="comma list of row counts M (default 1,128)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    layers = build(args.group_size)
    n_weights = sum(n * k for n, k in SHAPES) * LAYERS
    results = []
    with torch.inference_mode():
        for m in rows:
            torch._dynamo.reset()  # static-shape kernels: fresh graphs for each row count
            ks = kernels(layers, args.group_size)
            xs = {k: torch.randn(m, k) for k in (576, 1536)}
            times: dict[str, list[float]] = {name: [] for name in ks}
            for _name, (_b, fn) in ks.items():
                fn(xs)  # warm-up (and compile)
            for _ in range(args.repeats):
                for name, (_b, fn) in ks.items():
                    t0 = time.perf_counter()
                    fn(xs)
                    times[name].append(time.perf_counter() - t0)
            print(f"\nM = {m} rows, {n_weights / 1e6:.0f}M weights, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.2f}")
            print(f"{'kernel':<24} {'ms [min-max]':>22} {'G weights/s':>12} {'weight GB/s':>12}")
            for name, (bytes_per_weight, _fn) in ks.items():
                t = statistics.median(times[name])
                print(f"{name:<24} {1e3 * t:>9.2f} [{1e3 * min(times[name]):.2f}-{1e3 * max(times[name]):.2f}] "
                      f"{n_weights / t / 1e9:>12.2f} {n_weights * bytes_per_weight / t / 1e9:>12.2f}")
                results.append({"rows": m, "kernel": name, "ms_median": 1e3 * t, "ms_min": 1e3 * min(times[name]),
                                "ms_max": 1e3 * max(times[name]), "gweights_per_s": n_weights / t / 1e9,
                                "weight_gb_per_s": n_weights * bytes_per_weight / t / 1e9})
    if args.out:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "group_size": args.group_size,
                "machine": platform.machine(), "repeats": args.repeats, "weights": n_weights,
                "command": "python benchmarks/quant_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
