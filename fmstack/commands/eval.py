"""`fmstack eval hellaswag|perplexity`."""

from __future__ import annotations

import argparse
import json

from fmstack.commands.common import COMPILED_HELP, add_model_args, load_from_args, positive, want_compile
from fmstack.eval import hellaswag, perplexity

HELP = "evaluate a model: hellaswag, perplexity"


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    hs = sub.add_parser("hellaswag", help="HellaSwag zero-shot acc / acc_norm (lm-eval convention)")
    add_model_args(hs, compile_default=True, compile_help=COMPILED_HELP)
    hs.add_argument("--data", required=True, help="HellaSwag JSONL file (e.g. hellaswag_val.jsonl)")
    hs.add_argument("--limit", type=int, default=None, help="score only the first N rows (default: all)")
    hs.add_argument("--batch-size", type=int, default=32, help="rows per forward (default 32)")
    hs.add_argument("--output", default=None, help="write per-row predictions (JSON lines) here (default: none)")
    hs.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    pp = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    add_model_args(pp, compile_default=True, compile_help=COMPILED_HELP)
    pp.add_argument("--text", required=True, help="UTF-8 text file")
    pp.add_argument("--max-length", type=int, default=None, help="window length in tokens (default: model context)")
    pp.add_argument("--stride", type=int, default=None, help="window step in tokens (default: --max-length)")
    pp.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    pp.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


def run(args: argparse.Namespace) -> int:
    positive("--batch-size", args.batch_size)
    out = _hellaswag(args) if args.eval_task == "hellaswag" else _perplexity(args)
    if args.json:
        print(json.dumps(out))
    return 0


def _hellaswag(args: argparse.Namespace) -> dict:
    positive("--limit", args.limit)
    docs = hellaswag.load_docs(args.data, args.limit)
    loaded = load_from_args(args)
    result = hellaswag.evaluate(loaded.model, loaded.tokenizer, docs, batch_size=args.batch_size,
                                compile=want_compile(args), progress=True)
    if args.output:
        result.write_predictions(args.output)
    m = result.metrics

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    print(f"hellaswag  n={m['n']}  acc={fmt(m['acc'])} ± {fmt(m['acc_stderr'])}  "
          f"acc_norm={fmt(m['acc_norm'])} ± {fmt(m['acc_norm_stderr'])}  "
          f"({m['rows_per_s']:.2f} rows/s, {m['tokens_per_s']:.0f} tokens/s, {m['seconds']:.1f}s)")
    return {"task": "hellaswag", "model": args.model, "model_path": loaded.source, "dtype": args.dtype, **m}


def _perplexity(args: argparse.Namespace) -> dict:
    positive("--max-length", args.max_length)
    positive("--stride", args.stride)
    text = perplexity.read_text(args.text)
    loaded = load_from_args(args)
    m = perplexity.perplexity(loaded.model, loaded.tokenizer, text, max_length=args.max_length,
                              stride=args.stride, batch_size=args.batch_size, progress=True).metrics
    print(f"perplexity={m['perplexity']:.4f}  bits_per_byte={m['bits_per_byte']:.4f}  "
          f"word_perplexity={m['word_perplexity']:.3f}  ({m['tokens']} tokens, {m['windows']} windows, "
          f"{m['tokens_per_s']:.0f} tokens/s)")
    return {"task": "perplexity", "model": args.model, "model_path": loaded.source, "dtype": args.dtype, **m}
