"""One benchmark run: check the settings, load every system, measure them interleaved, report.

All systems are loaded first and then measured interleaved (for each batch size and repeat, every
system once), so machine load drifts hit all of them alike. Every batch size starts with an untimed
warm-up per system: it compiles that batch size's graphs (with --compile) and faults in the weights
and the KV cache, so that the timed runs measure steady-state decoding; what it compiled is reported
per row (`compiles`), and the timed runs must compile nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from fmstack.bench.measure import Memory, System, compile_counts, compile_counts_since, prompt_tokens
from fmstack.bench.peers import hf_eager_system, hf_static_compile_system, llamacpp_system, load_hf
from fmstack.bench.plot import plot, require_matplotlib, write_outputs
from fmstack.bench.report import Plan, build_report
from fmstack.bench.systems import fmstack_system, speculative_system
from fmstack.errors import ParameterError
from fmstack.generation.speculative import MAX_SPECULATE_K
from fmstack.loading import parse_device, parse_dtype
from fmstack.quant import BLOCK_MODES

log = logging.getLogger("fmstack.bench")

PEERS = ("hf", "llamacpp")
MODES = ("none", "int8", "int4") + BLOCK_MODES  # none: float weights (a GGUF dequantized)
DEFAULT_SPECULATE_K = 4


def comma_list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def check_args(args: argparse.Namespace) -> Plan:
    """The run's settings, checked before anything loads; ParameterError names the bad option."""
    try:
        batch_sizes = [int(b) for b in comma_list(args.batch_sizes)]
    except ValueError:
        raise ParameterError(f"--batch-sizes {args.batch_sizes!r}: expected a comma list of integers") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise ParameterError("--batch-sizes must list positive integers")
    if args.new_tokens < 2:
        raise ParameterError("--new-tokens must be >= 2 (one prefill token and at least one decode step)")
    if args.prompt_len < 1 or args.repeats < 1:
        raise ParameterError("--prompt-len and --repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ParameterError("--threads must be >= 1")
    peers = set(comma_list(args.peers))
    if peers - set(PEERS):
        raise ParameterError(f"--peers: unknown peer(s) {sorted(peers - set(PEERS))}; known: {', '.join(PEERS)}")
    modes = comma_list(args.quantize)
    if not modes or set(modes) - set(MODES) or len(set(modes)) != len(modes):
        raise ParameterError(f"--quantize {args.quantize!r}: expected a comma list of distinct modes from "
                             f"{', '.join(MODES)}")
    k = None
    if args.draft_model is not None or args.draft_quantize is not None:
        if "none" not in modes:
            raise ParameterError("--draft-model/--draft-quantize: the speculative target is the unquantized model; "
                                 "include 'none' in --quantize")
        k = DEFAULT_SPECULATE_K if args.speculate_k is None else args.speculate_k
    elif args.speculate_k is not None:
        raise ParameterError("--speculate-k needs a draft: pass --draft-model M and/or --draft-quantize int8|int4")
    if k is not None and not 1 <= k <= MAX_SPECULATE_K:
        raise ParameterError(f"--speculate-k {k} is invalid: must be in [1, {MAX_SPECULATE_K}]")
    if args.parallel not in ("none", "tp", "pp"):
        raise ParameterError(f"--parallel {args.parallel}: fmstack bench runs none, tp or pp")
    if peers and args.parallel != "none":
        raise ParameterError("--peers cannot be combined with --parallel")
    if k is not None and args.parallel != "none":
        raise ParameterError("--draft-model/--draft-quantize cannot be combined with --parallel")
    return Plan(batch_sizes, modes, peers, k, args.parallel)


def load_systems(args, plan: Plan, device, dtype) -> tuple[list[System], int]:
    """Every system of the run, loaded, and the vocabulary the random prompts draw from (the smallest)."""
    systems = [fmstack_system(args, device, dtype, None if m == "none" else m) for m in plan.modes]
    if plan.speculate_k is not None:
        systems.append(speculative_system(args, device, dtype, systems[plan.modes.index("none")], plan.speculate_k))
    if "llamacpp" in plan.peers:
        peer = llamacpp_system(args, device)
        if peer is not None:
            systems.append(peer)
    vocab = systems[0].vocab_size
    if "hf" in plan.peers:
        hf = load_hf(args, device, dtype)
        if hf is None:
            log.warning("--peers hf: %s is not a GGUF file or HF directory; no HF peers", args.model)
        else:
            model, load_s = hf
            vocab = min(vocab, model.config.vocab_size)
            systems.append(hf_eager_system(model, load_s, device))
            if args.compile:
                systems.append(hf_static_compile_system(model, load_s, device, args.prompt_len + args.new_tokens))
    return systems, vocab


def warm_up(args, systems: list[System], prompts, B: int) -> None:
    """The untimed run per system before batch size B's timed ones, logged with what it is for."""
    tokens = max(2, min(args.warmup_tokens, args.new_tokens))
    why = ("compiles this batch size's graphs" if args.compile else "eager: no compilation") \
        + ", faults in the weights and the KV cache"
    for s in systems:
        log.info("warm-up %s batch %d: %d untimed tokens (%s)", s.name, B, tokens, why)
        before, t0 = compile_counts(), time.perf_counter()
        s.generate(prompts, tokens)
        done = compile_counts_since(before)
        s.extra.setdefault("compiles", {})[B] = {"warmup": done, "timed": dict.fromkeys(before, 0)}
        log.info("warm-up %s batch %d: %.1f s, %d graph(s) compiled", s.name, B, time.perf_counter() - t0,
                 done["graphs"])


def measure_batch(args, systems: list[System], prompts, B: int, mem: Memory) -> None:
    """--repeats timed runs of every system at batch size B, interleaved; peak memory and compiles per system."""
    for s in systems:
        s.runs[B] = []
        if "counts" in s.extra:
            s.extra["counts"].update(proposed=0, accepted=0, rounds=0)  # count the timed runs only
    peak = {s.name: 0 for s in systems}
    base = {s.name: 0 for s in systems}
    for r in range(args.repeats):
        for s in systems:
            base_now = mem.current()
            mem.reset_peak()
            before = compile_counts()
            s.runs[B].append(s.generate(prompts, args.new_tokens))
            timed = s.extra["compiles"][B]["timed"]
            for k, v in compile_counts_since(before).items():
                timed[k] += v
            peak[s.name] = max(peak[s.name], mem.peak())
            base[s.name] = max(base[s.name], base_now)
            run_ = s.runs[B][-1]
            log.info("%s batch %d repeat %d: %.1f tok/s", s.name, B, r, run_.steps * B / run_.decode_s)
    for s in systems:
        s.peak_mem[B] = {"peak_mb": peak[s.name] / 2**20, "peak_over_start_mb": (peak[s.name] - base[s.name]) / 2**20}
        timed = s.extra["compiles"][B]["timed"]
        if timed["graphs"] or timed["graph_breaks"]:
            log.warning("%s batch %d: torch.compile compiled %d graph(s) (%d graph break(s)) during the timed "
                        "runs: a recompile inside a generation", s.name, B, timed["graphs"], timed["graph_breaks"])


def run(args: argparse.Namespace) -> dict | None:
    """Run the benchmark `args` describe (the options of `fmstack bench`), write `--out`/`--plot`, and
    return the report (None on the ranks of a torchrun job other than 0)."""
    plan = check_args(args)
    if args.plot:
        require_matplotlib()  # fail before a long benchmark, not after it
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, plan)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test, a script) keeps its own


def _run(args: argparse.Namespace, plan: Plan) -> dict | None:
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    compile_start = compile_counts()
    systems, vocab = load_systems(args, plan, device, dtype)
    mem = Memory(device)
    g = torch.Generator().manual_seed(args.seed)
    for B in plan.batch_sizes:
        prompts = prompt_tokens(args.prompt, systems[0].extra.get("tokenizer"), B, args.prompt_len, vocab,
                                g).to(device)
        active = [s for s in systems if s.runs_batch(B)]
        warm_up(args, active, prompts, B)
        measure_batch(args, active, prompts, B, mem)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = build_report(args, plan, device, systems, (load_start, load_end), compile_counts_since(compile_start))
    if plan.parallel != "none":
        import torch.distributed as dist

        report["meta"].update(parallel=plan.parallel, world_size=dist.get_world_size())
        if dist.get_rank() != 0:
            return None
    write_outputs(report, args.out, args.plot, plot)
    return report
