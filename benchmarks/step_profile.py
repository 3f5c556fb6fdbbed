"""Where a compiled decode step's time goes: a torch profile of `Generator.generate` on the default model,
per op per step (the native ops, Inductor's kernels with `cpp.enable_kernel_profile`, the compiled
graph's own Python, Dynamo's entry), averaged over the steps. A profile, not a speed benchmark: the
profiler adds its own time per recorded op; `fmstack bench` gives the speed.

    python benchmarks/step_profile.py --quantize gguf-a8 --threads 1 --out benchmarks/results/step_profile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantize", default="gguf-a8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    # a private Inductor cache: the kernel-profile build must not be confused with (or replace) the user's
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fmstack_step_profile_")
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.loading import load_model

    inductor_config.cpp.enable_kernel_profile = True
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m-instruct", quantize=args.quantize)
    gen = Generator(lm.model, lm.tokenizer, compile=True, compile_cache=False)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens + 1)
    gen.generate([[1, 2]], params)
    plain = gen.generate([[1, 2]], params)[0].decode_tokens_per_s
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = gen.generate([[1, 2]], params)[0]
    steps = len(result.token_ids) - 1
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    rows = [{"op": e.key, "calls_per_step": round(e.count / steps, 2),
             "self_ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 4)} for e in ops[:args.top]]
    out = {"benchmark": "step_profile", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "quantize": args.quantize, "threads": args.threads, "steps": steps, "load_avg": os.getloadavg(),
           "decode_tok_s_unprofiled": round(plain, 1), "decode_tok_s_profiled": round(result.decode_tokens_per_s, 1),
           "top_ops": rows}
    for r in rows:
        print(f"{r['op'][:60]:60s} {r['calls_per_step']:7.1f}/step {r['self_ms_per_step']:8.3f} ms/step")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
