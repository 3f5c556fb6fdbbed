"""Training speed: fmstack's training step (full and LoRA; eager and compiled) vs an HF transformers
training loop on the same model, data and optimizer, in the same run.

Every system runs the same step on the same batches: forward, next-token cross-entropy (fp32,
masked), backward, gradient clipping (1.0), AdamW. The HF side is `LlamaForCausalLM` loaded by
transformers from the same checkpoint (GGUF is dequantized by transformers); its LoRA adapters
are fmstack's `LoRALinear` on q/k/v/o/gate/up/down (7 per layer; fmstack has 4 fused ones of
the same rank, so the adapter parameter counts differ slightly: both are in the JSON).
Tokens/s = batch * seq_len / median step seconds over all passes; the first `--warmup` steps of
each pass (compilation) are excluded; `--passes` alternates the order of the systems.
The machine may be shared: the load average is recorded; numbers taken under load are noisy.

    python -m benchmarks.train --out benchmarks/results/train_cpu.json --plot benchmarks/results/train_cpu.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger("benchmarks.train")

TEXT = ("Training a language model means showing it text and nudging its weights so that each next token "
        "becomes a little more likely. The optimizer keeps running averages of the gradients and their "
        "squares, and the learning rate warms up before it decays along a cosine. ") * 40


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name or checkpoint path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps per system (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (compilation) (default 1)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--systems", default="fmstack-full,fmstack-full-compiled,hf-full,fmstack-lora,"
                                        "fmstack-lora-compiled,hf-lora",
                   help="comma list (default: all six)")
    p.add_argument("--passes", type=int, default=2,
                   help="run the system list this many times, alternating forward and reverse order, and pool "
                        "each system's timed steps (evens out load drifts on a shared machine) (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    return p.parse_args(argv)


def batches(tokenizer, n: int, batch: int, seq_len: int, max_seq_len: int):
    """`n` (inputs, labels) pairs `[batch, seq_len]` cut from the built-in text."""
    import tempfile

    from fmstack.train.data import load_dataset

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.txt"
        path.write_text(TEXT)
        ds = load_dataset(path, tokenizer, seq_len, max_seq_len)
    rows = torch.arange(n * batch) % len(ds)
    return [(ds.inputs[rows[i * batch:(i + 1) * batch]], ds.labels[rows[i * batch:(i + 1) * batch]])
            for i in range(n)]


def fmstack_model(args, lora: bool):
    from fmstack.loading import load_model
    from fmstack.train.lora import apply_lora

    model = load_model(args.model, device=args.device).model.train()
    if lora:
        apply_lora(model, args.lora_rank)
    else:
        model.requires_grad_(True)
    return model, lambda tokens: model(tokens)


def hf_model(args, lora: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from fmstack.bench.peers import hf_source
    from fmstack.train.lora import apply_lora

    hf_logging.disable_progress_bar()
    src = hf_source(args.model)
    model = AutoModelForCausalLM.from_pretrained(src[0], dtype=torch.float32, **src[1]).to(args.device).train()
    if lora:
        apply_lora(model, args.lora_rank, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"))
    else:
        model.requires_grad_(True)
    return model, lambda tokens: model(input_ids=tokens, use_cache=False).logits


def run_system(args, name: str, data) -> dict:
    from fmstack.train.loop import token_loss

    lora = "lora" in name
    compiled = name.endswith("compiled")
    t0 = time.perf_counter()
    model, forward = (hf_model if name.startswith("hf") else fmstack_model)(args, lora)
    load_s = time.perf_counter() - t0

    def loss_fn(tokens, labels, scale):
        return token_loss(forward(tokens), labels, scale)

    fn = torch.compile(loss_fn, fullgraph=True, dynamic=False) if compiled else loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    times, losses = [], []
    for tokens, labels in data:
        tokens, labels = tokens.to(args.device), labels.to(args.device)
        scale = torch.tensor(1.0 / (labels != -100).sum().item(), device=args.device)
        t = time.perf_counter()
        loss = fn(tokens, labels, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also synchronizes
        times.append(time.perf_counter() - t)
    timed = times[args.warmup:]
    med = statistics.median(timed)
    tokens_per_step = args.batch_size * args.seq_len
    out = {"name": name, "framework": name.split("-")[0], "mode": "lora" if lora else "full", "compiled": compiled,
           "trainable_params": sum(p.numel() for p in params), "load_s": round(load_s, 2),
           "step_s": times, "median_step_s": round(med, 4),
           "min_step_s": round(min(timed), 4), "max_step_s": round(max(timed), 4),
           "tokens_per_s": round(tokens_per_step / med, 2), "losses": [round(x, 5) for x in losses],
           "load_avg_after": os.getloadavg()}
    log.info("%s: %.1f tokens/s (median step %.3fs, first %.1fs, load %.1f)", name, out["tokens_per_s"], med,
             times[0], os.getloadavg()[0])
    del model, opt
    return out


def pool(args, runs: list[dict]) -> dict:
    """One system's passes -> one result: median and min/max over all timed steps of all passes."""
    steps = [t for r in runs for t in r["step_s"][args.warmup:]]
    med = statistics.median(steps)
    out = {k: v for k, v in runs[0].items() if k not in ("step_s", "load_avg_after")}
    out.update({"median_step_s": round(med, 4), "min_step_s": round(min(steps), 4), "max_step_s": round(max(steps), 4),
                "tokens_per_s": round(args.batch_size * args.seq_len / med, 2), "timed_steps": len(steps),
                "first_step_s": [round(r["step_s"][0], 2) for r in runs],
                "per_pass_tokens_per_s": [r["tokens_per_s"] for r in runs],
                "load_avg_after_each_pass": [r["load_avg_after"] for r in runs]})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from fmstack.loading import load_model

    probe = load_model(args.model)
    data = batches(probe.tokenizer, args.warmup + args.steps, args.batch_size, args.seq_len, probe.config.max_seq_len)
    del probe
    load_start = os.getloadavg()
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for p in range(args.passes):
        for name in (names if p % 2 == 0 else names[::-1]):
            runs[name].append(run_system(args, name, data))
    results = [pool(args, rs) for rs in runs.values()]
    by = {r["name"]: r for r in results}
    for r in results:  # ratio against the HF loop of the same mode
        hf = by.get(f"hf-{r['mode']}")
        r["vs_hf"] = round(r["tokens_per_s"] / hf["tokens_per_s"], 3) if hf else None
    report = {
        "benchmark": "train", "model": args.model, "device": args.device, "dtype": "fp32",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "timed_steps_per_pass": args.steps,
        "warmup_steps": args.warmup, "passes": args.passes,
        "lora_rank": args.lora_rank, "results": results,
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                 "threads": torch.get_num_threads(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
                 "note": "shared machine: timings under a high load average are noisy"},
    }
    print(f"{'system':<24}{'trainable':>12}{'tok/s':>10}{'median s':>10}{'min-max s':>16}{'first s':>9}{'vs HF':>8}")
    for r in results:
        spread = f"{r['min_step_s']:.2f}-{r['max_step_s']:.2f}"
        vs = f"{r['vs_hf']:.2f}x" if r["vs_hf"] else "-"
        print(f"{r['name']:<24}{r['trainable_params']:>12,}{r['tokens_per_s']:>10.1f}{r['median_step_s']:>10.3f}"
              f"{spread:>16}{max(r['first_step_s']):>9.1f}{vs:>8}")
    print(f"load average: start {load_start}, end {report['meta']['load_avg_end']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 0


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return
    rs = report["results"]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:blue" if r["framework"] == "fmstack" else "tab:orange" for r in rs]
    ax.bar([r["name"] for r in rs], [r["tokens_per_s"] for r in rs], color=colors)
    for i, r in enumerate(rs):
        ax.errorbar(i, r["tokens_per_s"], yerr=[[r["tokens_per_s"] - report["batch_size"] * report["seq_len"] /
                                                 r["max_step_s"]],
                                                [report["batch_size"] * report["seq_len"] / r["min_step_s"] -
                                                 r["tokens_per_s"]]], color="black", capsize=3)
    ax.set_ylabel("training tokens/s (median; bars: min-max step)")
    ax.set_title(f"{report['model']} fp32 {report['device']}, batch {report['batch_size']} x {report['seq_len']}, "
                 f"load {report['meta']['load_avg_start'][0]:.1f}")
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
