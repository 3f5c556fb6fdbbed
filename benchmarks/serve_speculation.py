"""Prompt-lookup speculation in the serving engine (no HTTP): decode tokens/s with and without it,
and its acceptance rate, on the default model (SmolLM2-135M-Instruct), greedy.

1. One client: a repetitive prompt (repeat a list), a code edit (the answer repeats the code) and a
   plain chat prompt, each with speculation off and with `ngram:K`; the greedy outputs must be equal.
2. The load threshold: B concurrent copies of the repetitive prompts for B in --batches, off and on
   (threshold disabled), aggregate decode tokens/s: speculation pays while the on/off ratio is > 1;
   `speculation.DEFAULT_MAX_BATCH` is set from it.

Decode time runs from each request's first token to its last (prefill excluded). The load average
is recorded before and after each run: on a shared machine the times are upper bounds.
Result JSON: benchmarks/results/serve_speculation_cpu.json.

    python -m benchmarks.serve_speculation [--k 4] [--max-tokens 64] [--batches 1,2,4,8] [--threads 1]
                                           [--batches-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fmstack.generation.sampling import SamplingParams
from fmstack.serve.engine import Engine, EngineConfig, RequestParams
from fmstack.serve.speculation import NgramProposer, SpeculationConfig

PROMPTS = {
    "repeat_list": "Repeat this list exactly, one item per line: apples, bananas, cherries, dates, elderberries, "
                   "figs, grapes, honeydew, kiwis, lemons, mangoes, nectarines, oranges, pears.",
    "code_edit": "Rename the variable x to total in this code and show the whole code:\n```python\n"
                 "def add_positive(items):\n    x = 0\n    for item in items:\n        if item > 0:\n"
                 "            x += item\n    return x\n```",
    "chat": "Write a short poem about the sea.",
}


def run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Greedy requests for `prompts` at once, stepped to the end: their tokens and decode times."""
    first, last, tokens = {}, {}, {}

    def cb(out):
        now = time.perf_counter()
        first.setdefault(out.request_id, now)
        last[out.request_id] = now
        tokens.setdefault(out.request_id, []).extend(out.token_ids)

    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, RequestParams(SamplingParams(max_new_tokens=max_tokens)), cb)
    load = os.getloadavg()
    spec = engine.speculator
    p0, a0 = (spec.proposed, spec.accepted) if spec else (0, 0)
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    wall = time.perf_counter() - t0
    decode_s = max(last.values()) - min(first.values())
    n = sum(len(t) for t in tokens.values()) - len(tokens)  # tokens after each request's first
    return {"tokens": [tokens[f"r{i}"] for i in range(len(prompts))], "decode_tokens": n, "decode_s": decode_s,
            "decode_tok_per_s": n / decode_s if decode_s else 0.0, "wall_s": wall,
            "proposed": spec.proposed - p0 if spec else 0, "accepted": spec.accepted - a0 if spec else 0,
            "loadavg_start": load, "loadavg_end": os.getloadavg()}


def compare(engine: Engine, prompts: list[list[int]], max_tokens: int, spec: SpeculationConfig) -> dict:
    engine.speculator = None
    off = run(engine, prompts, max_tokens)
    engine.speculator = NgramProposer(spec)
    on = run(engine, prompts, max_tokens)
    res = {"same_output": on.pop("tokens") == off.pop("tokens"), "off": off, "on": on,
           "speedup": on["decode_tok_per_s"] / off["decode_tok_per_s"] if off["decode_tok_per_s"] else 0.0,
           "acceptance_rate": on["accepted"] / on["proposed"] if on["proposed"] else 0.0}
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    from fmstack.loading import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--batches-only", action="store_true",
                    help="skip the one-client runs; add the batch runs to the existing result JSON")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m-instruct")
    tok = loaded.tokenizer
    engine = Engine(loaded.model, tok, EngineConfig(max_model_len=512, kv_cache_bytes=256 << 20, max_num_seqs=32))
    chats = {name: tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
             for name, text in PROMPTS.items()}
    spec = SpeculationConfig(k=args.k, max_batch=1 << 20)  # the threshold off: measured here
    path = Path(__file__).parent / "results" / "serve_speculation_cpu.json"
    res = {"model": "smollm2-135m-instruct", "threads": torch.get_num_threads(), "k": args.k,
           "max_tokens": args.max_tokens, "command": "python -m benchmarks.serve_speculation " + " ".join(sys.argv[1:]),
           "one_client": {}, "batches": {}}
    if args.batches_only:
        res = {**json.loads(path.read_text()), "command_batches_only": res["command"]}
    run(engine, [chats["chat"]], 4)  # warm-up
    for name, prompt in chats.items() if not args.batches_only else ():
        res["one_client"][name] = compare(engine, [prompt], args.max_tokens, spec)
    for b in (int(x) for x in args.batches.split(",")):
        prompts = [chats[("repeat_list", "code_edit", "chat")[i % 3]] for i in range(b)]
        res["batches"][str(b)] = compare(engine, prompts, args.max_tokens // 2, spec)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
