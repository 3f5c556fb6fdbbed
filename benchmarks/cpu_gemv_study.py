"""CPU batch-1 decode study: why fp32 decode sits far below the memory roofline, and what fixes it.

Sections (each prints a table; --out appends its results to a JSON file):

  bandwidth  streaming read bandwidth (a sum over a 512 MB tensor) and copy bandwidth, 1 and 2 threads:
             the roofline every GEMV is compared with.
  ops        the model's GEMVs ([1, K] x [K, N] for wqkv, wo, w_gate_up, w_down, output) under each
             kernel choice: MKL through F.linear (W [N, K]), x @ Wt (Wt [K, N] contiguous), torch.mv,
             MKL packed (what Inductor freezing emits), oneDNN packed, Inductor-generated reductions
             ((W * x).sum(-1)), and bf16-weight variants. Enough weight copies rotate per call that
             nothing stays in the L3 cache.
  step       one full decode step (model forward + argmax at batch 1 over the static KV cache,
             torch.compile(fullgraph=True) on the step function) under model variants and Inductor
             options, interleaved repeats; plus the sum of the step's GEMV times for the overhead split.

    python -m benchmarks.cpu_gemv_study bandwidth ops step --threads 2 --out benchmarks/results/cpu_gemv_study.json
    python -m benchmarks.cpu_gemv_study step --variants eager,compile,reduce --steps 32 --repeats 7

Every table reports the median over repeats with [min-max]; the load average is printed with each
section because this machine is shared. Timings of different methods are interleaved (A, B, C, A, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("benchmarks.cpu_gemv_study")

# SmolLM2-135M GEMVs per token: (name, N, K, count per token)
SHAPES = [("wqkv", 960, 576, 30), ("wo", 576, 576, 30), ("w_gate_up", 3072, 576, 30),
          ("w_down", 576, 1536, 30), ("output", 49152, 576, 1)]
L3_DEFEAT_BYTES = 160 * 2**20  # rotate at least this many weight bytes per timed call group


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn; calls alternate between fns on every repeat."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out[k].append((time.perf_counter() - t0) / inner)
    return out


def med(v: list[float]) -> float:
    return statistics.median(v)


# -- bandwidth -------------------------------------------------------------------------------------

def section_bandwidth(args) -> dict:
    x = torch.randn(128 * 2**20)  # 512 MiB
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    res = {}
    threads = torch.get_num_threads()
    for th in sorted({1, threads}):
        torch.set_num_threads(th)
        t = timeit_interleaved({"read (sum)": lambda: x.sum(), "copy": lambda: y.copy_(x)}, args.repeats)
        res[f"{th} threads"] = {"read_gb_s": {"median": nbytes / med(t["read (sum)"]) / 1e9,
                                              "max": nbytes / min(t["read (sum)"]) / 1e9},
                                "copy_gb_s": {"median": 2 * nbytes / med(t["copy"]) / 1e9,
                                              "max": 2 * nbytes / min(t["copy"]) / 1e9}}
    torch.set_num_threads(threads)
    print(f"\n## bandwidth (512 MiB tensor; copy counts read + write bytes), load avg {load_avg()}")
    for k, v in res.items():
        print(f"{k}: read {v['read_gb_s']['median']:.1f} GB/s (best {v['read_gb_s']['max']:.1f}), "
              f"copy {v['copy_gb_s']['median']:.1f} GB/s (best {v['copy_gb_s']['max']:.1f})")
    return res


# -- per-op GEMVs ----------------------------------------------------------------------------------

def gemv_methods(N: int, K: int, copies: int, which: set[str] | None, rows: int = 1
                 ) -> dict[str, tuple[Callable, list, int]]:
    """name -> (fn(weight_obj) -> out, weight objects to rotate through, bytes per weight), for
    `rows` activation rows (1: a GEMV)."""
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(N, K, generator=g) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, K, generator=g)
    xb = x.bfloat16()
    m: dict[str, tuple[Callable, list, int]] = {}

    def want(name: str) -> bool:
        return which is None or name in which

    if want("F.linear"):
        m["F.linear"] = (lambda W: F.linear(x, W), Ws, 4)
    if want("x@Wt"):
        m["x@Wt"] = (lambda Wt: x @ Wt, [W.t().contiguous() for W in Ws], 4)
    if want("mv") and rows == 1:
        m["mv"] = (lambda W: torch.mv(W, x[0]), Ws, 4)
    if want("mkl-packed") and torch._C.has_mkl:
        packed = [(torch.ops.mkl._mkl_reorder_linear_weight(W, rows), W) for W in Ws]
        m["mkl-packed"] = (lambda p: torch.ops.mkl._mkl_linear(x, p[0], p[1], None, rows), packed, 4)
    if want("onednn-packed"):
        packed = [torch.ops.mkldnn._reorder_linear_weight(W, rows) for W in Ws]
        m["onednn-packed"] = (lambda W: torch.ops.mkldnn._linear_pointwise(x, W, None, "none", [], ""), packed, 4)
    if want("inductor-reduce"):
        red = torch.compile(lambda W, x: (W * x[:, None, :]).sum(-1), dynamic=False, fullgraph=True)
        m["inductor-reduce"] = (lambda W: red(W, x), Ws, 4)
    if want("inductor-reduce-Wt"):
        redt = torch.compile(lambda Wt, x: (Wt * x[:, :, None]).sum(1), dynamic=False, fullgraph=True)
        m["inductor-reduce-Wt"] = (lambda Wt: redt(Wt, x), [W.t().contiguous() for W in Ws], 4)
    bf = [W.bfloat16() for W in Ws] if any(want(k) for k in ("bf16-F.linear", "bf16-onednn-packed",
                                                               "bf16w-inductor-reduce")) else []
    if want("bf16-F.linear"):
        m["bf16-F.linear"] = (lambda W: F.linear(xb, W), bf, 2)
    if want("bf16-onednn-packed"):
        packed = [torch.ops.mkldnn._reorder_linear_weight(W, rows) for W in bf]
        m["bf16-onednn-packed"] = (lambda W: torch.ops.mkldnn._linear_pointwise(xb, W, None, "none", [], ""),
                                   packed, 2)
    if want("bf16w-inductor-reduce"):
        redb = torch.compile(lambda W, x: (W.float() * x[:, None, :]).sum(-1), dynamic=False, fullgraph=True)
        m["bf16w-inductor-reduce"] = (lambda W: redb(W, x), bf, 2)
    return m


def section_ops(args) -> dict:
    which = set(args.methods.split(",")) if args.methods else None
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    print(f"\n## per-op [{args.rows},K]x[K,N], {torch.get_num_threads()} threads, median [min-max] us and "
          f"weight GB/s at the median, load avg {load_avg()}")
    res = {}
    for name, N, K, _count in shapes:
        copies = max(2, -(-L3_DEFEAT_BYTES // (N * K * 4)))
        methods = gemv_methods(N, K, copies, which, args.rows)
        fns = {}
        for k, (fn, objs, _) in methods.items():
            fns[k] = (lambda fn=fn, objs=objs: [fn(o) for o in objs])
        t = timeit_interleaved(fns, args.repeats)
        res[name] = {}
        print(f"{name} N={N} K={K} ({N * K * 4 / 1e6:.1f} MB fp32)")
        for k, v in t.items():
            per = [s / copies for s in v]
            nbytes = N * K * methods[k][2]
            res[name][k] = {"us": {"median": med(per) * 1e6, "min": min(per) * 1e6, "max": max(per) * 1e6},
                            "gb_s": nbytes / med(per) / 1e9, "gb_s_best": nbytes / min(per) / 1e9}
            print(f"  {k:24s} {med(per) * 1e6:9.1f} us [{min(per) * 1e6:.0f}-{max(per) * 1e6:.0f}] "
                  f"{nbytes / med(per) / 1e9:6.1f} GB/s (best {nbytes / min(per) / 1e9:.1f})")
        del methods, fns
    return res


# -- model variants for the decode step ------------------------------------------------------------

class ReduceLinear(nn.Module):
    """y = x W^T as an elementwise product + sum over K when there are few rows (decode), so
    Inductor emits one streaming, vectorized reduction (and fuses a bf16 -> fp32 upconvert of W into
    it); F.linear otherwise (prefill). `weight` may be bf16: compute stays fp32."""

    def __init__(self, weight: Tensor, max_rows: int = 1):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.max_rows = max_rows

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[:-1].numel() <= self.max_rows:
            return (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1)
        return F.linear(x, self.weight.to(x.dtype))


class TransposedLinear(nn.Module):
    """y = x @ Wt with Wt stored [K, N] contiguous (the BLAS 'NN' GEMV path)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.wt = nn.Parameter(weight.t().contiguous(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.wt.to(x.dtype)


class Bf16Linear(nn.Module):
    """bf16 weights, bf16 GEMM (oneDNN; native AVX512-BF16 where the CPU has it), fp32 in and out:
    activations are rounded to bf16 at the matmul input, like a bf16 model."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.bfloat16(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.bfloat16(), self.weight).to(x.dtype)


class Bf16WeightLinear(nn.Module):
    """bf16 weights, fp32 activations and accumulation: F.linear(x, W.to(x.dtype)); with
    compile_decode the upconvert happens inside the GEMV reduction (no fp32 copy of W)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.bfloat16(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def swap_linears(model: nn.Module, make: Callable[[Tensor], nn.Module]) -> nn.Module:
    """Replace every nn.Linear (the output projection too) by make(weight)."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, name, make(child.weight.detach()))
    return model


# name -> (model transform or None, torch.compile options or None (eager), threads override or None)
def variant_table() -> dict[str, tuple[Callable | None, dict | None, str]]:
    cpp = "CPP,ATEN"
    return {
        "eager": (None, None, "model(...) + argmax, no compile"),
        "compile": (None, {}, "torch.compile(fullgraph=True), default Inductor"),
        "compile-cpp_wrapper": (None, {"cpp_wrapper": True}, "+ cpp_wrapper"),
        "freezing": (None, {"freezing": True}, "+ freezing (MKL packed weights)"),
        "freezing-cpp_wrapper": (None, {"freezing": True, "cpp_wrapper": True}, "+ freezing + cpp_wrapper"),
        "max-autotune": (None, {"max_autotune": True, "max_autotune_gemm_backends": cpp},
                         "+ max_autotune, CPP GEMM templates"),
        "freezing-max-autotune": (None, {"freezing": True, "max_autotune": True,
                                         "max_autotune_gemm_backends": cpp}, "+ freezing + max_autotune CPP"),
        "coordinate-descent": (None, {"coordinate_descent_tuning": True}, "+ coordinate_descent_tuning"),
        "eager-wt": (lambda m: swap_linears(m, TransposedLinear), None, "eager, weights stored [K, N]"),
        "compile-wt": (lambda m: swap_linears(m, TransposedLinear), {}, "compile, weights stored [K, N]"),
        "reduce": (lambda m: swap_linears(m, ReduceLinear), {}, "compile, GEMV as (x*W).sum(-1) reductions"),
        "reduce-cpp_wrapper": (lambda m: swap_linears(m, ReduceLinear), {"cpp_wrapper": True},
                               "reductions + cpp_wrapper"),
        "reduce-simdlen256": (lambda m: swap_linears(m, ReduceLinear), {"cpp.simdlen": 256},
                              "reductions, AVX2-width vectors"),
        "bf16w-reduce": (lambda m: swap_linears(m, lambda w: ReduceLinear(w.bfloat16())), {"cpp_wrapper": True},
                         "bf16 weights, fp32 compute: W.float() fused into the reductions (+cpp_wrapper)"),
        "bf16-onednn-freezing": (lambda m: swap_linears(m, Bf16Linear), {"freezing": True, "cpp_wrapper": True},
                                 "bf16 weights + bf16 matmul inputs, oneDNN packed (freezing)"),
        # fmstack.generation.compile: the model unchanged, mm with 1 row lowered to a reduction.
        "compile_decode": (None, "compile_decode", "fmstack compile_decode: M=1 mm -> reduction, cpp_wrapper"),
        "compile_decode-wt": (lambda m: swap_linears(m, TransposedLinear), "compile_decode",
                              "compile_decode on [K, N] weights (reduction over a strided K)"),
        "compile_decode-bf16w": (lambda m: swap_linears(m, lambda w: Bf16WeightLinear(w)), "compile_decode",
                                 "compile_decode, bf16 weights upconverted inside the reductions"),
    }


_MODELS: dict[str, nn.Module] = {}


def streamed_bytes(model: nn.Module) -> int:
    """Bytes read per batch-1 token: every parameter except embedding tables (one row is read),
    unless the table is shared with the output projection (tied); shared storage counted once."""
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            continue
        for p in mod.parameters(recurse=False):
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total


def build_step(variant: str, model_spec: str, prompt_len: int, steps: int):
    """(step callable running `steps` decode steps, weight bytes, description)."""
    import copy

    from fmstack.generation.kv_cache import StaticKVCache
    from fmstack.loading import load_model

    transform, options, desc = variant_table()[variant]
    if model_spec not in _MODELS:
        _MODELS[model_spec] = load_model(model_spec).model
    model = copy.deepcopy(_MODELS[model_spec])  # each variant owns its weights (freezing repacks them)
    if transform is not None:
        model = transform(model)
    cfg = model.config
    cache = StaticKVCache(cfg, 1, 256 * (-(-(prompt_len + steps + 1) // 256)))
    weight_bytes = streamed_bytes(model)

    def step(tokens: Tensor, positions: Tensor, cache: StaticKVCache) -> Tensor:
        return model(tokens, positions, cache)[:, -1].argmax(-1)

    # Dynamo keeps its compiled entries (and the recompile limit) per code object: give each variant
    # its own, so variants neither hit the limit nor pay for each other's guard checks.
    code = step.__code__.replace(co_name=f"step_{variant.replace('-', '_')}")
    step = types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)

    if options is None:
        fn = step
    elif options == "compile_decode":
        from fmstack.generation.compile import compile_decode

        fn = compile_decode(step, "cpu")
    else:
        fn = torch.compile(step, fullgraph=True, dynamic=False, options=options)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g)
    with torch.inference_mode():
        model(prompt, torch.arange(prompt_len)[None], cache)  # fill the cache (eager prefill)

    @torch.inference_mode()
    def run_steps() -> list[float]:
        """Seconds of each of `steps` decode steps (per-step samples: on a shared machine a low
        percentile of them shows the uncontended speed, the median the typical one)."""
        tok = torch.zeros(1, 1, dtype=torch.long)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            tok = fn(tok, torch.tensor([[prompt_len + i]]), cache)[:, None]
            tok.tolist()  # the host reads each token, as a generator does
            times.append(time.perf_counter() - t0)
        return times

    t0 = time.perf_counter()
    run_steps()  # compile
    log.info("%s: warm-up (compile) %.1fs", variant, time.perf_counter() - t0)
    return run_steps, weight_bytes, desc


def gemv_sum_ms(ops: dict, method: str) -> float | None:
    """Sum over one token's GEMVs of the per-op median (ms), for `method` from the ops section."""
    total = 0.0
    for name, _N, _K, count in SHAPES:
        if name not in ops or method not in ops[name]:
            return None
        total += count * ops[name][method]["us"]["median"] / 1e3
    return total


def section_step(args, ops: dict | None) -> dict:
    variants = args.variants.split(",")
    unknown = set(variants) - set(variant_table())
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(variant_table())}")
    built = {}
    for v in variants:
        try:
            built[v] = build_step(v, args.model, args.prompt_len, args.steps)
        except Exception as e:  # a variant that does not compile is a result too
            log.warning("%s failed: %s: %s", v, type(e).__name__, str(e).splitlines()[0][:300])
            built[v] = None
    ok = {v: b for v, b in built.items() if b is not None}
    la = load_avg()
    t: dict[str, list[float]] = {v: [] for v in ok}
    for _ in range(args.repeats):  # interleaved: every variant runs `steps` steps per round
        for v, b in ok.items():
            t[v].extend(b[0]())
    la_end = load_avg()
    print(f"\n## decode step, batch 1, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds of "
          f"{args.steps} steps, load avg {la} -> {la_end}")
    print("ms/step over all steps: median [p10-p90]; tok/s at the median and at p10 ('p10'); GB/s at the median")
    print(f"{'variant':24s} {'ms/step median [p10-p90]':>28s} {'tok/s':>7s} {'p10':>6s} {'GB/s':>6s}  description")
    res = {"load_avg_start": la, "load_avg_end": la_end, "threads": torch.get_num_threads(), "variants": {}}
    for v, b in built.items():
        if b is None:
            res["variants"][v] = {"failed": True, "description": variant_table()[v][2]}
            print(f"{v:24s} {'failed':>28s}")
            continue
        ms = sorted(x * 1e3 for x in t[v])
        m, p10, p90 = med(ms), ms[len(ms) // 10], ms[(9 * len(ms)) // 10]
        res["variants"][v] = {"ms": {"median": m, "p10": p10, "p90": p90, "min": ms[0], "max": ms[-1],
                                     "n": len(ms)},
                              "tok_s": 1e3 / m, "tok_s_p10": 1e3 / p10, "gb_s": b[1] / m / 1e6,
                              "gb_s_p10": b[1] / p10 / 1e6, "streamed_bytes": b[1], "description": b[2]}
        spread = f"{m:.2f} [{p10:.2f}-{p90:.2f}]"
        print(f"{v:24s} {spread:>28s} {1e3 / m:7.1f} {1e3 / p10:6.1f} {b[1] / m / 1e6:6.1f}  {b[2]}")
    if ops:
        print("sum of the step's GEMV medians from the ops section (ms):",
              ", ".join(f"{k} {gemv_sum_ms(ops, k):.2f}" for k in ops.get("wqkv", {}) if gemv_sum_ms(ops, k)))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sections", nargs="+", choices=["bandwidth", "ops", "step"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shapes", default="", help="ops: comma list of shape names (default all)")
    p.add_argument("--methods", default="", help="ops: comma list of methods (default all)")
    p.add_argument("--rows", type=int, default=1, help="ops: activation rows M (1 = GEMV, batch-1 decode)")
    p.add_argument("--variants", default="eager,compile,freezing,freezing-cpp_wrapper,compile-wt,reduce,"
                                         "reduce-cpp_wrapper", help=f"step: comma list of {', '.join(variant_table())}")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="step: decode steps per timing")
    p.add_argument("--out", default=None, help="append {section: results} to this JSON file")
    p.add_argument("--tag", default="", help="key suffix for the JSON results (e.g. threads1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch._dynamo.config.recompile_limit = 64
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, ATen "
          f"{torch.backends.cpu.get_cpu_capability()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    results: dict = {}
    ops = None
    for s in args.sections:
        if s == "bandwidth":
            results["bandwidth"] = section_bandwidth(args)
        elif s == "ops":
            results["ops"] = ops = section_ops(args)
        else:
            results["step"] = section_step(args, ops)
    if args.out:
        path = Path(args.out)
        data = json.loads(path.read_text()) if path.is_file() else {}
        for k, v in results.items():
            data[k + (f"-{args.tag}" if args.tag else "")] = {"load_avg": load_avg(), "threads": torch.get_num_threads(),
                                                               "command": " ".join(sys.argv), **{"results": v}}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
