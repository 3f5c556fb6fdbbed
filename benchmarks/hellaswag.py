"""HellaSwag scoring throughput: fmstack's packed scorer vs HF transformers scoring row by row.

Both score the same token requests (fmstack's tokenization, lm-eval's convention) with the same fp32
weights. HF runs the way lm-eval's HF backend scores a row: the 4 sequences context + ending,
right-padded, one forward, full-vocabulary log_softmax, sum over continuation tokens. Timed: model
work only (tokenization excluded for both); runs alternate fmstack / HF, and each figure is the median
over repeats with the min-max spread. Writes benchmarks/results/hellaswag_cpu.json (or _cuda).

    python benchmarks/hellaswag.py --rows 100 --repeats 3 [--threads 1]

On a shared machine, use --threads 1 when another process holds a core: two OpenMP threads then
wait on each other at every op and both backends slow down many times over, unevenly.
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val_dev.jsonl"


def hf_score_rows(model, rows: list[list[tuple[list[int], list[int]]]], device) -> list[list[float]]:
    """Per row: its continuations' summed log-probs, from one padded forward of context + ending."""
    out = []
    with torch.inference_mode():
        for reqs in rows:
            seqs = [c + k for c, k in reqs]
            T = max(len(s) for s in seqs)
            ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)
            logp = model(ids).logits.float().log_softmax(-1)  # [4, T, V]
            row = []
            for i, (c, k) in enumerate(reqs):
                pos = torch.arange(len(c) - 1, len(c) - 1 + len(k), device=device)
                row.append(logp[i, pos, torch.tensor(k, device=device)].sum().item())
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="compile fmstack's scoring forward")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--output", default=None, help="JSON path (default benchmarks/results/hellaswag_<device>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from fmstack.checkpoints.named import DEFAULT_MODEL, resolve_model_path
    from fmstack.eval import hellaswag as hs
    from fmstack.eval.scoring import Score, Scorer
    from fmstack.loading import load_model

    path = resolve_model_path(DEFAULT_MODEL)
    loaded = load_model(str(path), device=args.device, dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf = hf.to(args.device).eval()
    examples = [hs.to_example(d) for d in hs.load_docs(args.data, args.rows)]
    requests = hs.build_requests(loaded.tokenizer, examples)
    rows = [requests[4 * i:4 * i + 4] for i in range(len(examples))]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run_fmstack():
        scorer = Scorer(loaded.model, batch_size=args.batch_size, compile=args.compile)
        sync()
        t0 = time.perf_counter()
        scores = scorer.score(requests)
        sync()
        return time.perf_counter() - t0, scores, scorer.stats

    def run_hf():
        sync()
        t0 = time.perf_counter()
        ll = hf_score_rows(hf, rows, args.device)
        sync()
        return time.perf_counter() - t0, [x for r in ll for x in r]

    load_start = os.getloadavg()
    run_fmstack(), hf_score_rows(hf, rows[:2], args.device)  # warm-up (and compile)
    fm_s, hf_s = [], []
    for rep in range(args.repeats):
        t, fm_scores, stats = run_fmstack()
        fm_s.append(t)
        t, hf_ll = run_hf()
        hf_s.append(t)
        print(f"repeat {rep}: fmstack {fm_s[-1]:.2f}s  hf {hf_s[-1]:.2f}s", file=sys.stderr)
    n = len(examples)
    fm_ll = [s.logprob for s in fm_scores]
    hf_scores = [Score(x, False, len(k)) for x, (_, k) in zip(hf_ll, requests)]
    max_diff = max(abs(a - b) for a, b in zip(fm_ll, hf_ll))
    pred_agree = sum(hs._argmax(fm_ll[4 * i:4 * i + 4]) == hs._argmax(hf_ll[4 * i:4 * i + 4]) for i in range(n)) / n
    norm_agree = sum(r.pred_norm == h.pred_norm for r, h in zip(hs.score_examples(examples, fm_scores),
                                                               hs.score_examples(examples, hf_scores))) / n

    def summary(times):
        rps = sorted(n / t for t in times)
        return {"rows_per_s": round(statistics.median(rps), 3), "min": round(rps[0], 3), "max": round(rps[-1], 3),
                "seconds": [round(t, 3) for t in times]}

    fm, ref = summary(fm_s), summary(hf_s)
    hf_tokens = sum(len(r) * max(len(c) + len(k) for c, k in r) for r in rows)
    result = {
        "benchmark": "hellaswag", "device": args.device, "rows": n, "repeats": args.repeats,
        "batch_size": args.batch_size, "compile": args.compile, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "fmstack": {**fm, "forward_tokens": stats.forward_tokens, "padded_tokens": stats.padded_tokens,
                    "forwards": stats.forwards},
        "hf": {**ref, "padded_tokens": hf_tokens},
        "speedup": round(fm["rows_per_s"] / ref["rows_per_s"], 2),
        "max_abs_loglik_diff": max_diff, "pred_agreement": pred_agree, "pred_norm_agreement": norm_agree,
        "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg()),
    }
    print(f"{'':10s} {'rows/s (median)':>16s} {'min':>8s} {'max':>8s} {'tokens run':>11s}")
    print(f"{'fmstack':10s} {fm['rows_per_s']:16.2f} {fm['min']:8.2f} {fm['max']:8.2f} {stats.padded_tokens:11d}")
    print(f"{'hf':10s} {ref['rows_per_s']:16.2f} {ref['min']:8.2f} {ref['max']:8.2f} {hf_tokens:11d}")
    print(f"speedup {result['speedup']:.2f}x over {n} rows, {args.repeats} repeats; "
          f"max |loglik diff| {max_diff:.2e}; pred agreement acc {pred_agree:.3f}, acc_norm {norm_agree:.3f}; "
          f"load average {load_start[0]:.2f} -> {result['load_avg_end'][0]:.2f}")
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"hellaswag_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
