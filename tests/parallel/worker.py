"""Run by test_tp.py / test_pp.py under `torchrun --nproc-per-node 2` (gloo): for each checkpoint,
load it single-process and with `--parallel MODE`, compare logits, greedy generation and eval
scoring, and (rank 0) write the numbers as JSON. test_ring.py runs `--mode cp` (`compare_cp`)
with 2 and 3 ranks.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/parallel/worker.py \
        --mode tp --out results.json CKPT[:int8] ...
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from fmstack.eval.scoring import Scorer
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model

PROMPTS = [[5, 17, 3], [9, 2, 44, 7, 101, 6, 12]]  # different lengths: left padding in the batch
REQUESTS = [([1, 2, 3, 4], [5, 6]), ([1, 2, 3, 4], [7, 8, 9]), ([10, 11], [12]), ([13, 14, 15], [16, 17]),
            ([20, 21, 22, 23, 24], [25]), ([30], [31, 32, 33])]


def local_numel(model: torch.nn.Module) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel()
    return n


@torch.inference_mode()
def compare(path: str, mode: str, quantize: str | None) -> dict:
    ref = load_model(path, quantize=quantize).model
    par = load_model(path, quantize=quantize, parallel=mode).model
    if mode == "pp":
        par.micro_batches = 2  # several micro-batches even for a small scoring batch
    V = ref.config.vocab_size
    tokens = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(0))
    a, b = ref(tokens), par(tokens)
    a1, b1 = ref(tokens, last_only=True), par(tokens, last_only=True)
    params = SamplingParams(max_new_tokens=16)
    ga = [r.token_ids for r in Generator(ref, eos_ids=[]).generate(PROMPTS, params)]
    gb = [r.token_ids for r in Generator(par, eos_ids=[]).generate(PROMPTS, params)]
    sa, sb = Scorer(ref, batch_size=4).score(REQUESTS), Scorer(par, batch_size=4).score(REQUESTS)
    out = {
        "logits_shape": list(b.shape), "logits_max_abs": (a - b).abs().max().item(),
        "logits_scale": a.abs().max().item(), "last_only_max_abs": (a1 - b1).abs().max().item(),
        "tokens_ref": ga, "tokens_par": gb,
        "score_max_abs": max(abs(x.logprob - y.logprob) for x, y in zip(sa, sb)),
        "score_greedy_equal": [x.greedy for x in sa] == [y.greedy for y in sb],
        "full_numel": local_numel(ref), "local_numel": local_numel(par),
        "kv_heads": par.layers[0].attn.n_kv_heads, "layers": [blk.attn.layer for blk in par.layers],
    }
    return out


@torch.inference_mode()
def compile_check(path: str, mode: str) -> dict:
    """Generation with compile=True (fullgraph prefill + decode for tp; the stage's layers for pp):
    graph breaks, graphs, and tokens vs eager; a second prompt length must not recompile."""
    from torch._dynamo.utils import counters

    par = load_model(path, parallel=mode).model
    params = SamplingParams(max_new_tokens=12)
    eager = [r.token_ids for r in Generator(par, eos_ids=[], max_seq_len=64).generate(PROMPTS, params)]
    counters.clear()
    gen = Generator(par, eos_ids=[], compile=True, max_seq_len=64)
    compiled = [r.token_ids for r in gen.generate(PROMPTS, params)]
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = [r.token_ids for r in gen.generate([p + [3, 4] for p in PROMPTS], params)]
    return {"graph_breaks": dict(counters["graph_break"]), "graphs": graphs, "equal": eager == compiled,
            "second_length_ok": len(again) == 2}


@torch.inference_mode()
def compare_cp(path: str) -> dict:
    """Context parallel vs single process: logits for lengths below/at/above 2N and not divisible by N,
    step-by-step prefill + decode logits through the sharded cache (left-padded batch), greedy
    generation, and scoring (packed masks and long single sequences)."""
    from fmstack.generation.kv_cache import StaticKVCache

    ref = load_model(path).model
    par = load_model(path, parallel="cp").model
    V, N = ref.config.vocab_size, dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    logits, scale = {}, 0.0
    for B, T in [(3, 13), (2, 37), (1, 2 * N - 1), (1, 2 * N), (2, 100)]:
        tokens = torch.randint(0, V, (B, T), generator=g)
        a = ref(tokens)
        scale = max(scale, a.abs().max().item())
        logits[f"{B}x{T}"] = max((a - par(tokens)).abs().max().item(),
                                 (a[:, -1:] - par(tokens, last_only=True)).abs().max().item())
    # prefill (left padding) then decode, logits compared at every step
    lens, steps, S = [23, 41], 12, 64
    L = max(lens)
    pad = torch.tensor([L - n for n in lens])
    tokens = torch.randint(1, V, (2, L), generator=g)
    positions = torch.arange(L)[None] - pad[:, None]
    c_ref, c_par = StaticKVCache(ref.config, 2, S), par.make_cache(2, S)
    c_ref.reset(pad), c_par.reset(pad)
    a, b = ref(tokens, positions, c_ref, last_only=True), par(tokens, positions, c_par, last_only=True)
    step_diffs = [(a - b).abs().max().item()]
    nxt, pos = a[:, -1].argmax(-1), torch.tensor(lens)
    for _ in range(steps):
        a, b = ref(nxt[:, None], pos[:, None], c_ref), par(nxt[:, None], pos[:, None], c_par)
        step_diffs.append((a - b).abs().max().item())
        nxt, pos = a[:, -1].argmax(-1), pos + 1
    params = SamplingParams(max_new_tokens=16)
    long_prompt = torch.randint(0, V, (50,), generator=g).tolist()
    ga = [r.token_ids for r in Generator(ref, eos_ids=[]).generate(PROMPTS, params)]
    gb = [r.token_ids for r in Generator(par, eos_ids=[]).generate(PROMPTS, params)]
    ga += [r.token_ids for r in Generator(ref, eos_ids=[]).generate([long_prompt], params)]
    gb += [r.token_ids for r in Generator(par, eos_ids=[]).generate([long_prompt], params)]
    long_req = [(long_prompt[:30], long_prompt[30:]), (long_prompt[:5], long_prompt[5:45])]
    sa = Scorer(ref, batch_size=4).score(REQUESTS) + Scorer(ref, batch_size=1).score(long_req)
    sb = Scorer(par, batch_size=4).score(REQUESTS) + Scorer(par, batch_size=1).score(long_req)
    return {
        "world": N, "logits_max_abs": logits, "logits_scale": scale, "step_max_abs": step_diffs,
        "tokens_ref": ga, "tokens_par": gb,
        "score_max_abs": max(abs(x.logprob - y.logprob) for x, y in zip(sa, sb)),
        "score_greedy_equal": [x.greedy for x in sa] == [y.greedy for y in sb],
        "kv_bytes_ref": c_ref.nbytes, "kv_bytes_par": c_par.nbytes, "kv_fill": c_par.fill,
        "kv_length": c_par.length,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", required=True, choices=["tp", "pp", "cp"])
    p.add_argument("--out", required=True)
    p.add_argument("--compile-check", action="store_true", help="run compile_check on each case instead")
    p.add_argument("cases", nargs="+", help="checkpoint path, optionally :int8")
    args = p.parse_args()
    results = {}
    for case in args.cases:
        path, _, quant = case.partition(":")
        # the first case joins the process group
        if args.mode == "cp":
            mine = compare_cp(path)
        else:
            mine = compile_check(path, args.mode) if args.compile_check else compare(path, args.mode, quant or None)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
        results[f"{os.path.basename(path)}{':' + quant if quant else ''}"] = per_rank
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
