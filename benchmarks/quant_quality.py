"""Quality of quantization on SmolLM2-135M-Instruct (fp32 run dtype): HellaSwag acc_norm and perplexity
for fp32, int8, int4 round-to-nearest, int4 GPTQ, and the block-layout modes (`fmstack.quant`): gguf
(the GGUF file's own blocks: fp32's values, so its row equals fp32's), gguf-a8 (the same with int8
activations), w8a8 and w4a8 (fmstack's int8 / int4 g32 weights with int8 activations).

Data (all from the HellaSwag developer file, three disjoint row ranges):
  * HellaSwag: rows [0, --rows) (default 500), scored as `fmstack eval hellaswag` does.
  * Perplexity text: rows [--ppl-rows) (default 1000:1200), each row's `ctx` + " " + its correct
    ending (both through HellaSwag's `preprocess`), rows joined by blank lines; written to
    --workdir/ppl_text.txt. Windows of --ppl-length tokens, stride --ppl-stride.
  * GPTQ calibration: the `ctx` field of every other row (500:1000 and 1200:, by default), written to
    --workdir/calib.jsonl; --calib-samples windows of --calib-len tokens (seed 0).
Quantized modes are evaluated, by default, with fp32 Linear modules holding the dequantized weights
(the function the int8/int4 kernels compute; checked against the kernels on a few tokens and reported
as `kernel_check`), because the native CPU int8/int4 kernels are one to two orders of magnitude slower
than the fp32 matmul on this machine; --kernels evaluates through them.
Besides the metrics, each quantized mode reports how many HellaSwag predictions (acc_norm argmax)
differ from fp32's on the same rows ("flips"): a paired, much less noisy closeness measure.
The block modes are always evaluated through their modules (`blocks.block_linear`): int8 activations
are part of the function, and scoring calls are large enough that dequantizing per call is cheap.

    python benchmarks/quant_quality.py                      # full table (slow on CPU)
    python benchmarks/quant_quality.py --rows 50 --modes fp32,int4-g32,gptq-g32   # quick look
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val_dev.jsonl"
DEFAULT_MODES = "fp32,int8,int4-g32,gptq-g32,gptqh-g32,int4-g64,gptq-g64,gptqh-g64,gguf,gguf-a8,w8a8,w4a8"
BLOCK_MODES = ("gguf", "gguf-a8", "w8a8", "w4a8")

log = logging.getLogger("quant_quality")


def parse_range(text: str) -> tuple[int, int]:
    a, b = text.split(":")
    return int(a), int(b)


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_quantized(base, mode: str, calib: torch.Tensor, act_order: bool, model_spec: str):
    """mode: fp32 | int8 | int4-gNN (round to nearest) | gptq-gNN (head rounded to nearest) | gptqh-gNN
    (head GPTQ-quantized too) | gguf | gguf-a8 (`model_spec` loaded keeping its GGUF blocks) | w8a8 | w4a8
    -> (model with the quantized modules, its portable tensors, seconds to quantize or load)."""
    from fmstack.loading import load_model
    from fmstack.quant import QuantSpec, quantize_model
    from fmstack.quant.gptq import gptq_quantize

    if mode == "fp32":
        return base, {}, 0.0
    t0 = time.perf_counter()
    if mode in ("gguf", "gguf-a8"):
        return load_model(model_spec, quantize=mode).model, {}, time.perf_counter() - t0
    model, keep = copy.deepcopy(base), {}
    if mode in ("int8", "w8a8", "w4a8"):
        quantize_model(model, QuantSpec(mode), keep=keep)
    else:
        kind, g = mode.split("-g")
        if kind == "int4":
            quantize_model(model, QuantSpec("int4", int(g)), keep=keep)
        elif kind in ("gptq", "gptqh"):
            gptq_quantize(model, calib, QuantSpec("gptq", int(g)), act_order=act_order, keep=keep,
                          head="gptq" if kind == "gptqh" else "rtn")
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    return model, keep, time.perf_counter() - t0


@torch.no_grad()
def dequantized_copy(model, keep: dict):
    """The quantized model with every quantized projection replaced by an fp32 nn.Linear holding its
    dequantized weight: the same function the int8/int4 kernels compute (up to summation order)."""
    from fmstack.quant import _set_module, quantizable_linears, spec_of
    from fmstack.quant.linear import dequantize_int4
    from fmstack.quant.ops import unpack_uint4

    spec = spec_of(model)
    out = copy.deepcopy(model)
    for name, mod in quantizable_linears(out):
        q, s = keep[f"{name}.qweight"], keep[f"{name}.scales"]
        if spec.bits == 8:
            w = q.float() * s.float()[:, None]
        else:
            w = dequantize_int4(unpack_uint4(q), s.float(), keep[f"{name}.zeros"].float(), spec.group_size)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.copy_(w)
        _set_module(out, name, lin.requires_grad_(False))
    return out


def markdown(results: list[dict], setup: dict) -> str:
    lines = [f"| mode | HellaSwag acc_norm (n={setup['hellaswag_rows']}) | flips vs fp32 | perplexity | "
             f"Δppl vs fp32 | weights MB |",
             "|---|---|---|---|---|---|"]
    ref = results[0]
    for r in results:
        hs, pp = r["hellaswag"], r["perplexity"]
        flips = "—" if r["mode"] == "fp32" else f"{r['flips_vs_fp32']}"
        dppl = "—" if r["mode"] == "fp32" else f"{pp['perplexity'] - ref['perplexity']['perplexity']:+.3f}"
        lines.append(f"| {r['label']} | {100 * hs['acc_norm']:.1f} ± {100 * hs['acc_norm_stderr']:.1f} | {flips} | "
                     f"{pp['perplexity']:.3f} | {dppl} | {r['weight_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--rows", type=int, default=500, help="HellaSwag rows scored: [0, rows)")
    ap.add_argument("--ppl-rows", default="1000:1200", help="rows whose ctx + correct ending form the text")
    ap.add_argument("--ppl-length", type=int, default=512)
    ap.add_argument("--ppl-stride", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--act-order", action="store_true", help="GPTQ with act_order (static groups)")
    ap.add_argument("--modes", default=DEFAULT_MODES,
                    help=f"comma list of fp32, int8, int4-gG (round to nearest), gptq-gG (GPTQ, output head rounded "
                         f"to nearest), gptqh-gG (GPTQ, head too), gguf, gguf-a8, w8a8, w4a8 (block layout, see "
                         f"fmstack.quant) (default {DEFAULT_MODES}); fp32 is always first")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--kernels", action="store_true",
                    help="evaluate through the int8/int4 kernels (very slow on CPUs without their fast paths); "
                         "default: fp32 Linear modules holding the dequantized weights, checked against the "
                         "kernels on --check-tokens tokens")
    ap.add_argument("--check-tokens", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/fmstack_quant_quality")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "quant_quality.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)

    from fmstack.eval import hellaswag as hs
    from fmstack.eval.perplexity import perplexity
    from fmstack.loading import load_model, param_bytes
    from fmstack.quant.gptq import calibration_ids

    modes = [m for m in args.modes.split(",") if m and m != "fp32"]
    modes = ["fp32", *modes]
    all_rows = read_rows(Path(args.data))
    p0, p1 = parse_range(args.ppl_rows)
    if not args.rows <= p0 < p1 <= len(all_rows):
        raise SystemExit(f"--ppl-rows {args.ppl_rows} must lie within [{args.rows}, {len(all_rows)}]")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ppl_path, calib_path = work / "ppl_text.txt", work / "calib.jsonl"
    ppl_text = "\n\n".join(hs.preprocess(r["ctx"]) + " " + hs.preprocess(r["endings"][int(r["label"])])
                           for r in all_rows[p0:p1])
    ppl_path.write_text(ppl_text, encoding="utf-8")
    calib_rows = list(range(args.rows, p0)) + list(range(p1, len(all_rows)))
    with open(calib_path, "w", encoding="utf-8") as f:
        for i in calib_rows:
            f.write(json.dumps({"ctx": all_rows[i]["ctx"]}) + "\n")

    loaded = load_model(args.model, dtype="fp32")
    base, tok = loaded.model, loaded.tokenizer
    calib = calibration_ids(tok, calib_path, args.calib_samples, args.calib_len, seed=0)
    docs = all_rows[:args.rows]
    setup = {
        "model": loaded.source, "dtype": "fp32", "device": "cpu", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "hellaswag_data": args.data, "hellaswag_rows": len(docs),
        "perplexity_text": f"{ppl_path}: HellaSwag dev rows {p0}:{p1}, preprocess(ctx) + ' ' + "
                           f"preprocess(correct ending), joined by blank lines ({len(ppl_text)} chars)",
        "perplexity_windows": {"max_length": args.ppl_length, "stride": args.ppl_stride},
        "calibration": f"{calib_path}: 'ctx' of HellaSwag dev rows {args.rows}:{p0} and {p1}:{len(all_rows)} "
                       f"({len(calib_rows)} rows), {args.calib_samples} random windows x {args.calib_len} tokens, "
                       f"seed 0", "calibration_tokens_available": len(tok.encode("\n\n".join(
                           all_rows[i]["ctx"].strip() for i in calib_rows), add_bos=False)),
        "gptq": {"act_order": args.act_order, "damp": 0.01, "block_size": 128, "output_head": "round to nearest"},
    }
    check_tokens = torch.tensor([tok.encode(ppl_text, add_bos=False)[:args.check_tokens]])
    results, ref_pred = [], None
    for mode in modes:
        model, keep, q_s = make_quantized(base, mode, calib, args.act_order, args.model)
        kernel_check, weight_mb = None, param_bytes(model) / 2 ** 20
        if keep and not args.kernels and mode not in BLOCK_MODES:
            deq = dequantized_copy(model, keep)
            with torch.inference_mode():
                a, b = model(check_tokens), deq(check_tokens)
            kernel_check = {"tokens": check_tokens.shape[1], "max_abs_logit_diff": (a - b).abs().max().item(),
                            "max_abs_logit": b.abs().max().item()}
            log.info("%s: kernel vs dequantized fp32 weights on %d tokens: max |logit diff| %.2e", mode,
                     check_tokens.shape[1], kernel_check["max_abs_logit_diff"])
            del model
            model = deq
        t0 = time.perf_counter()
        res = hs.evaluate(model, tok, docs, batch_size=args.batch_size)
        pp = perplexity(model, tok, ppl_text, max_length=args.ppl_length, stride=args.ppl_stride)
        preds = [r.pred_norm for r in res.rows]
        if ref_pred is None:
            ref_pred = preds
        label = mode + (" (act_order)" if mode.startswith("gptq") and args.act_order else "")
        label = label.replace("gptqh-", "gptq+head-")
        r = {"mode": mode, "label": label, "quantize_s": round(q_s, 1), "eval_s": round(time.perf_counter() - t0, 1),
             "evaluated_with": "fp32" if mode == "fp32" else ("kernels" if args.kernels or mode in BLOCK_MODES
                                                               else "dequantized"),
             "kernel_check": kernel_check, "weight_mb": weight_mb, "hellaswag": res.metrics, "perplexity": pp.metrics,
             "flips_vs_fp32": sum(a != b for a, b in zip(preds, ref_pred))}
        results.append(r)
        log.info("%s: acc_norm %.4f  ppl %.4f  flips %d  (quantize %.0fs, eval %.0fs)", label,
                 res.metrics["acc_norm"], pp.metrics["perplexity"], r["flips_vs_fp32"], q_s, r["eval_s"])
        if model is not base:
            del model, keep
            gc.collect()
        partial = {"setup": setup, "results": results, "complete": False}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(partial, indent=2) + "\n")
    table = markdown(results, setup)
    out = {"setup": setup, "results": results, "complete": True, "markdown": table}
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(table)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
