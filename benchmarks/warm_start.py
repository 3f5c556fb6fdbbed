"""Where a warm start's time goes: one process loads the model, builds a compiled `Generator` and
generates a few tokens; it prints (one JSON object) the seconds from loaded weights to the first tokens,
the compile counters and cache hits, the process's CPU seconds, and Dynamo's per-phase compile times
(`torch._dynamo.utils.compile_times`). Run it once on an empty cache (cold: compiles and saves), then
again on the same cache (warm). docs/compile.md ("Warm start") has the figures.

    export FMSTACK_CACHE_DIR=$(mktemp -d)
    python benchmarks/warm_start.py            # cold
    python benchmarks/warm_start.py            # warm (twice: the first warm run may still warm the page cache)
    FMSTACK_PRECOMPILE=0 python benchmarks/warm_start.py   # the caches' artifacts only (Dynamo traces again)
"""

import argparse
import json
import logging
import resource
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/warm_start.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    for name in ("torch", "torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from torch._dynamo.utils import compile_times

    from fmstack.backends import cache_counters, compile_counters
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.loading import load_model

    model = load_model(args.model).model
    loaded = time.perf_counter()
    gen = Generator(model, eos_ids=[], compile=True, max_seq_len=256)
    out = gen.generate([[1, 2]] * args.batch_size, SamplingParams(max_new_tokens=args.new_tokens))
    first_tokens = time.perf_counter() - loaded
    phases = compile_times(repr="csv", aggregate=True)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "ids": out[0].token_ids, "first_tokens_s": round(first_tokens, 2), "prefill_s": round(out[0].prefill_s, 2),
        "cpu_s": round(own.ru_utime + own.ru_stime, 1), "children_cpu_s": round(children.ru_utime + children.ru_stime, 1),
        **compile_counters(), **cache_counters(),
        "compile_times_s": {k: float(v) for k, v in zip(*phases) if float(v or 0) >= 0.05} if phases else {}},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
