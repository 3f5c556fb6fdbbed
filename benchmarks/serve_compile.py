"""The serving engine's compile cost: `Engine.warm_up("all")` (every decode bucket up to
`--max-num-seqs`, and the flattened prefill step) of the default model, compiled, 2 threads, in a fresh
process from an empty compile cache (cold), then in a second process on that cache (warm). The native
kernels and Inductor's ISA record are copied from this machine's cache (built once per install), so
"cold" is a cold compile on a machine that compiled before. Each run is one entry of
`benchmarks/results/serve_compile_cpu.json`, keyed by `--label` (replaced when measured again): run it
for the code before and after a change in one series, the before from a worktree:

    PYTHONPATH=/path/to/worktree python benchmarks/serve_compile.py --label before
    python benchmarks/serve_compile.py --label after
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "serve_compile_cpu.json"

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from fmstack.backends import compile_counters
from fmstack.loading import load_model
from fmstack.serve.engine import Engine, EngineConfig
loaded = load_model("smollm2-135m-instruct", quantize="auto")
engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_num_seqs=int(sys.argv[2]), max_model_len=512,
                                                              compile=True))
t0 = time.perf_counter()
buckets = engine.warm_up("all")
print(json.dumps({"warm_up_s": round(time.perf_counter() - t0, 2), "buckets": buckets, **compile_counters()}))
"""


def run_phase(cache: Path, threads: int, max_num_seqs: int) -> dict:
    env = {**os.environ, "FMSTACK_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(max_num_seqs)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the engine process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True, help="the entry of the result file this run replaces")
    ap.add_argument("--max-num-seqs", type=int, default=1, help="largest decode bucket (default 1: bucket 1 only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from fmstack.paths import cache_dir

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fmstack-serve-compile-") as tmp:
        cache = Path(tmp)
        for keep in ("kernels", "isa"):  # built once per install / recorded once per machine
            if (cache_dir() / keep).is_dir():
                shutil.copytree(cache_dir() / keep, cache / keep)
        t0 = time.perf_counter()
        cold = run_phase(cache, args.threads, args.max_num_seqs)
        cold["process_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        warm = run_phase(cache, args.threads, args.max_num_seqs)
        warm["process_s"] = round(time.perf_counter() - t0, 1)
    entry = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "command": " ".join([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
                                 + ["python", *sys.argv]),
             "model": "smollm2-135m-instruct (GGUF blocks), Engine.warm_up('all'), max_model_len 512",
             "threads": args.threads, "max_num_seqs": args.max_num_seqs, "cold": cold, "warm": warm,
             "load_avg_before_after": [round(load_start[0], 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(entry, indent=1))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    results["runs"][args.label] = entry
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
