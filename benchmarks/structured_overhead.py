"""Share of the serving engine's decode time spent on grammar masks (structured output), default model.

Runs the engine (no HTTP) on SmolLM2-135M-Instruct with B = 1 and 16 concurrent JSON-schema chat
requests, timing every engine step and the runner's mask work: `fill_masks` (filling the bitmasks,
on a thread overlapped with the model step) and `apply_masks` (waiting for them and applying them:
what the step pays, `mask_share_of_decode`); also the same requests unconstrained, for the decode tokens/s either way. Both
engine steps are measured in one run: eager and compiled (`--modes`). The load average before and
after each run is recorded: on a shared machine the times are upper bounds.
Result JSON: benchmarks/results/structured_overhead_cpu.json.

    python -m benchmarks.structured_overhead [--max-tokens 40] [--modes eager,compiled] [--threads N]
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
from fmstack.serve import runner as runner_mod
from fmstack.serve.engine import Engine, EngineConfig, RequestParams
from fmstack.generation.structured import apply_masks, compile_constraint, fill_masks

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "bio": {"type": "string"}}, "required": ["name", "age", "bio"]}
TIMES = {"mask": 0.0, "fill": 0.0}


def _timed_masks(rows, matchers, filled=None):
    t = time.perf_counter()
    apply_masks(rows, matchers, filled)
    TIMES["mask"] += time.perf_counter() - t


def _timed_fill(matchers):
    t = time.perf_counter()
    filled = fill_masks(matchers)
    TIMES["fill"] += time.perf_counter() - t
    return filled


def run(engine: Engine, prompt: list[int], batch: int, max_tokens: int, constraint) -> dict:
    TIMES["mask"] = TIMES["fill"] = 0.0
    for i in range(batch):
        sp = SamplingParams(max_new_tokens=max_tokens, temperature=0.8, seed=i)
        engine.add_request(f"r{i}-{constraint is not None}", prompt, RequestParams(sp, constraint=constraint),
                           lambda out: None)
    steps = tokens = 0
    step_s = 0.0
    while engine.has_work():
        t = time.perf_counter()
        n = engine.step()
        if n <= batch:  # decode steps only (prefill steps run the prompt)
            step_s += time.perf_counter() - t
            tokens += n
            steps += 1
    mask_s = TIMES["mask"]
    return {"batch": batch, "decode_steps": steps, "decode_tokens": tokens, "decode_s": step_s,
            "decode_tok_per_s": tokens / step_s if step_s else 0.0, "mask_s": mask_s,
            "mask_share_of_decode": mask_s / step_s if step_s else 0.0, "mask_fill_on_thread_s": TIMES["fill"]}


def main() -> None:
    from fmstack.loading import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--modes", default="eager,compiled", help="engine steps to measure: eager, compiled or both")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 on a busy shared machine, see `serve --threads`)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m-instruct")
    tok = loaded.tokenizer
    runner_mod.apply_masks = _timed_masks  # the runner's call sites, timed
    runner_mod.fill_masks = _timed_fill
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}]))
    constraint = compile_constraint(tok, "json_schema", SCHEMA)
    path = Path(__file__).parent / "results" / "structured_overhead_cpu.json"
    res = {"model": "smollm2-135m-instruct", "threads": torch.get_num_threads(), "max_tokens": args.max_tokens,
           "command": "python -m benchmarks.structured_overhead " + " ".join(sys.argv[1:]), "runs": []}
    for mode in args.modes.split(","):
        engine = Engine(loaded.model, tok, EngineConfig(max_model_len=512, kv_cache_bytes=256 << 20,
                                                        prefix_caching=False, compile=mode == "compiled"))
        run(engine, prompt, 16, 4, None)  # warm-up (compiled: the graphs of both batch sizes' steps)
        run(engine, prompt, 1, 4, constraint)
        start_masks = engine.runner._start_masks  # masks_overlapped False: filled after the step, serially
        for batch in (1, 16):
            for c, overlap in ((None, True), (constraint, False), (constraint, True)):
                load = os.getloadavg()
                engine.runner._start_masks = start_masks if overlap else (lambda chunks: None)
                r = {"mode": mode, "constrained": c is not None, "masks_overlapped": overlap,
                     **run(engine, prompt, batch, args.max_tokens, c), "loadavg_start": load,
                     "loadavg_end": os.getloadavg()}
                print(r, flush=True)
                res["runs"].append(r)
                path.write_text(json.dumps(res, indent=1) + "\n")  # after every run: a cut-off run keeps the rest
    print("wrote", path)


if __name__ == "__main__":
    main()
