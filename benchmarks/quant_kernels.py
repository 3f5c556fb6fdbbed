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

and the block kernels of `fmstack.native` (`torch.ops.fmstack.block_linear`), per code path
(`--isas`: avx512vnni, avxvnni, avx2, scalar; those this CPU has), on the block layouts GGUF files
keep as they are:

  Q4_1 <isa> <act>       the 30 layers' projections as Q4_1 (4-bit, block 32, fp16 scale + min: 0.625 B/weight)
  Q8_0 <isa> <act>       the same as Q8_0 (8-bit, block 32, fp16 scale: 1.0625 B/weight)
  model <isa> <act>      Q4_1 layers + the Q8_0 LM head (49152 x 576): a whole batch-1 decode's weights (94 MB)
  memory read            an int64 sum over 94 MB: the streaming bandwidth the machine gives right now

with <act> int8-act (activations quantized per block to int8, integer dot products) or float-act
(weights dequantized in registers against float32 activations). "weight GB/s" counts each kernel's
weight bytes (scales and mins included) per second.

Timings of the kernels are interleaved per repeat; medians with [min-max]. The JSON keeps the previous
file's rows under "previous" (other row counts, another day's load).

    python benchmarks/quant_kernels.py --rows 1,4 --threads 2 --out benchmarks/results/quant_kernels_cpu.json
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

from fmstack import native  # noqa: E402
from fmstack.quant import QuantSpec, ops, rtn_portable  # noqa: E402
from fmstack.quant.blocks import BlockWeight, PackedBlocks, pack_rows
from fmstack.quant.linear import Int4Linear, Int8Linear, quantize_int8  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) per layer
LAYERS = 30
HEAD = (49152, 576)
BYTES = {"Q4_1": 0.5 + 4 / 32, "Q8_0": 1 + 2 / 32}  # per weight, scales and mins included


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


def random_blocks(layout: str, n: int, k: int, g: torch.Generator) -> PackedBlocks:
    """Random values in a GGUF layout, interleaved as modules hold them (timing only: the kernels'
    speed does not depend on the values)."""
    scales = (torch.rand(n, k // 32, generator=g) * 0.01).half()
    if layout == "Q4_1":
        q = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        return pack_rows(BlockWeight(q, scales, -8 * scales, 4, 32))
    return pack_rows(BlockWeight(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), scales, None, 8, 32))


def block_kernels(isas: list[str]) -> dict:
    """name -> (weights, weight bytes, fields, fn over the {K: x} activations) for the native block kernels."""
    g = torch.Generator().manual_seed(1)
    layers = {lay: [random_blocks(lay, n, k, g) for _ in range(LAYERS) for n, k in SHAPES] for lay in BYTES}
    head = random_blocks("Q8_0", *HEAD, g)
    n_layers, n_head = sum(n * k for n, k in SHAPES) * LAYERS, HEAD[0] * HEAD[1]

    def over(ws, isa, int8_act):
        def run(xs):
            native.isa(isa)
            for w in ws:
                native.block_linear(xs[w.in_features], w.qweight, w.scales, w.mins, w.bits, w.block, w.n, int8_act)
        return run

    ks = {}
    for isa in dict.fromkeys(native.isa(i) for i in isas):
        for int8_act in (True, False):
            act = "int8-act" if int8_act else "float-act"
            for lay, per_weight in BYTES.items():
                ks[f"{lay} {isa} {act}"] = (n_layers, n_layers * per_weight, {"layout": lay, "isa": isa, "int8_act": int8_act},
                                            over(layers[lay], isa, int8_act))
            ks[f"model {isa} {act}"] = (n_layers + n_head, n_layers * BYTES["Q4_1"] + n_head * BYTES["Q8_0"],
                                        {"layout": "Q4_1 layers + Q8_0 head", "isa": isa, "int8_act": int8_act},
                                        over(layers["Q4_1"] + [head], isa, int8_act))
    read = torch.ones(int(n_layers * BYTES["Q4_1"] + n_head * BYTES["Q8_0"]) // 8, dtype=torch.int64)
    ks["memory read"] = (0, read.numel() * 8, {"layout": "int64 sum"}, lambda xs: read.sum())
    return ks


def all_kernels(layers, group_size: int, isas: list[str]) -> dict:
    """Every kernel as name -> (weights, weight bytes, extra JSON fields, fn)."""
    n_weights = sum(n * k for n, k in SHAPES) * LAYERS
    ks = {name: (n_weights, n_weights * b, {}, fn) for name, (b, fn) in kernels(layers, group_size).items()}
    if isas and native.available():
        ks.update(block_kernels(isas))
    return ks


def time_kernels(ks: dict, m: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds per kernel and repeat. Under load (other processes on the cores) the
    CPU time is the steadier figure: a descheduled thread adds wall time, not CPU time."""
    xs = {k: torch.randn(m, k) for k in (576, 1536)}
    times: dict[str, list[float]] = {name: [] for name in ks}
    cpu: dict[str, list[float]] = {name: [] for name in ks}
    for *_, fn in ks.values():
        fn(xs)  # warm-up (and compile)
    for _ in range(repeats):
        for name, (*_, fn) in ks.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn(xs)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return times, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,128", help="comma list of row counts M (default 1,128)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--isas", default="avx512vnni,avxvnni,avx2",
                   help="native block-kernel paths to time, comma list (default avx512vnni,avxvnni,avx2; '' for none)")
    p.add_argument("--out", default=None, help="write the results as JSON here (its old rows kept under 'previous')")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    layers = build(args.group_size)
    isas = [i for i in args.isas.split(",") if i]
    results = []
    with torch.inference_mode():
        for m in rows:
            torch._dynamo.reset()  # static-shape kernels: fresh graphs for each row count
            ks = all_kernels(layers, args.group_size, isas)
            times, cpu = time_kernels(ks, m, args.repeats)
            print(f"\nM = {m} rows, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"load avg {os.getloadavg()[0]:.2f}")
            print(f"{'kernel':<28} {'ms [min-max]':>22} {'G weights/s':>12} {'weight GB/s':>12} {'CPU ms':>8}")
            for name, (n_weights, n_bytes, fields, _fn) in ks.items():
                t = statistics.median(times[name])
                print(f"{name:<28} {1e3 * t:>9.2f} [{1e3 * min(times[name]):.2f}-{1e3 * max(times[name]):.2f}] "
                      f"{n_weights / t / 1e9:>12.2f} {n_bytes / t / 1e9:>12.2f} {1e3 * statistics.median(cpu[name]):>8.2f}")
                results.append({"rows": m, "kernel": name, **fields, "weights": n_weights, "weight_bytes": n_bytes,
                                "ms_median": 1e3 * t, "ms_min": 1e3 * min(times[name]), "ms_max": 1e3 * max(times[name]),
                                "gweights_per_s": n_weights / t / 1e9, "weight_gb_per_s": n_bytes / t / 1e9,
                                "cpu_ms_median": 1e3 * statistics.median(cpu[name]), "load_avg": os.getloadavg()[0]})
    if args.out:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "group_size": args.group_size,
                "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "repeats": args.repeats, "load_avg_1_5_15": os.getloadavg(),
                "command": "python benchmarks/quant_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        out = Path(args.out)
        previous = json.loads(out.read_text()) if out.is_file() else None
        if previous is not None and "previous" in previous:  # one generation back is enough
            previous = {k: v for k, v in previous.items() if k != "previous"}
        out.write_text(json.dumps({"meta": meta, "results": results, "previous": previous}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
