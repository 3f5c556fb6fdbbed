"""`fmstack compile`: build a model's compiled generation steps ahead of time into fmstack's compile
cache (`fmstack.generation.compile_cache`), so the first request of a later `generate`/`serve
--compile` loads them instead of compiling (see docs/compile.md)."""

from __future__ import annotations

import argparse
import logging
import time

from fmstack.commands.common import DTYPES, add_model_name_arg, add_quant_args, load_from_args, positive
from fmstack.errors import ParameterError
from fmstack.generation.compile_cache import compile_cache_dir, kernel_cache_dir
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import SamplingParams

log = logging.getLogger("fmstack")

HELP = "compile a model's prefill and decode steps ahead of time into the compile cache"


def configure(p: argparse.ArgumentParser) -> None:
    add_model_name_arg(p, "registry name, checkpoint path (.gguf, HF dir, Meta dir) or random:<config>")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="run dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    add_quant_args(p)
    p.add_argument("--batch-sizes", default="1", help="comma list of batch sizes to build (default 1)")
    p.add_argument("--sampled", action="store_true",
                   help="also build the sampling graphs (default: the greedy ones only)")


def batch_sizes(text: str) -> list[int]:
    """`--batch-sizes` "1,4" -> [1, 4]; each a positive integer."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ParameterError(f"--batch-sizes {text!r}: expected a comma list of positive integers, e.g. 1,4") from None
    if not sizes:
        raise ParameterError("--batch-sizes is empty: give at least one batch size, e.g. 1")
    for b in sizes:
        positive("--batch-sizes", b)
    return sorted(set(sizes))


def run(args: argparse.Namespace) -> int:
    sizes = batch_sizes(args.batch_sizes)
    loaded = load_from_args(args)
    gen = Generator(loaded.model, loaded.tokenizer, eos_ids=[], compile=True)
    variants = [SamplingParams(max_new_tokens=2)]
    if args.sampled:
        variants.append(SamplingParams(max_new_tokens=2, temperature=1.0, seed=0))
    for b in sizes:
        for params in variants:
            t0 = time.perf_counter()
            gen.generate([[1, 2]] * b, params)  # a 2-token prompt: the prefill graph, then decode
            print(f"batch {b} {'sampled' if params.temperature else 'greedy'}: prefill + decode ready "
                  f"in {time.perf_counter() - t0:.1f} s")
    print(f"compile cache: {compile_cache_dir()} (Inductor's kernels: {kernel_cache_dir()})")
    return 0
