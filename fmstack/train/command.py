"""`fmstack finetune`: the command's arguments and logic (registered in fmstack/cli.py)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from fmstack.errors import ParameterError

log = logging.getLogger("fmstack.finetune")


def configure(p: argparse.ArgumentParser) -> None:
    from fmstack.checkpoints.named import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model to fine-tune: registry name or checkpoint path (default: {DEFAULT_MODEL})")
    p.add_argument("--data", required=True,
                   help=".txt (plain text) or .jsonl (prompt/completion, chat messages, or text per line)")
    p.add_argument("--out", required=True, help="output directory: fmstack checkpoint + train_log.jsonl + "
                                                "train_state.pt (resume)")
    p.add_argument("--lora-rank", type=int, default=None, help="train rank-R LoRA adapters (merged on save) "
                                                               "instead of all weights")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 * rank)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default steps/10), then cosine")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr (default 0.1)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per micro-step (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: 256 for .txt, the longest example for .jsonl)")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA init seed (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward+backward, fullgraph (default: on for CUDA, off for CPU, where "
                        "compiling a model the size of SmolLM2 takes minutes)")
    p.add_argument("--save-every", type=int, default=0, help="write the resume state every N steps (default: end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="weights and optimizer state dtype (default fp32; bf16 is pure-bf16 training)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--parallel", default="auto", choices=["auto", "none", "fsdp"],
                   help="data parallel: fsdp shards the model over the ranks of a torchrun job (FSDP2); "
                        "auto = fsdp under torchrun with several ranks, else none")
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last stdout line")


def _train_config(args: argparse.Namespace):
    from fmstack.train.loop import TrainConfig

    return TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                       activation_checkpointing=args.activation_checkpointing,
                       compile=args.compile if args.compile is not None else args.device.startswith("cuda"),
                       save_every=args.save_every)


def run(args: argparse.Namespace) -> dict:
    """Fine-tune as `args` say, save to `--out`, and return the run's summary (what `--json` prints)."""
    import torch

    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.loading import load_model, parse_device
    from fmstack.parallel import dist as fdist
    from fmstack.train.data import load_dataset
    from fmstack.train.loop import STATE_FILE, Trainer

    cfg = _train_config(args)
    cfg.check()
    device = parse_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1")) if fdist.launched_by_torchrun() else 1
    mode = args.parallel
    if mode == "auto":
        mode = "fsdp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ParameterError("--parallel none under torchrun with several ranks would train copies side by side; "
                             "use --parallel fsdp (or auto)")
    out = Path(args.out)
    error, rank = None, 0
    if mode == "fsdp":
        info = fdist.init_distributed(device)
        device, rank = info.device, info.rank
    try:
        if out.exists() and not out.is_dir():
            raise ParameterError(f"--out {out}: exists and is not a directory")
        if (out / STATE_FILE).is_file() and not args.resume:
            raise ParameterError(f"--out {out} already holds a training run ({STATE_FILE}); pass --resume to "
                                 "continue it or choose another --out")
        loaded = load_model(args.model, device=device, dtype=args.dtype, seed=args.seed)
        data = load_dataset(args.data, loaded.tokenizer, args.seq_len, loaded.config.max_seq_len)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        if mode != "fsdp":
            raise
        error = e
    if mode == "fsdp":
        fdist.fail_together(error)
        torch.distributed.barrier()
    trainer = Trainer(loaded.model, data, cfg, device=device, parallel=mode if mode == "fsdp" else None)
    if args.resume and not trainer.load_state(out):
        log.info("--resume: no %s in %s; starting from step 0", STATE_FILE, out)
    result = trainer.fit(out, progress=True)
    model = trainer.export_model()
    if model is not None:
        save_checkpoint(out, model, loaded.tokenizer, source=loaded.source)
    summary = {
        "model": loaded.source, "data": data.source, "data_kind": data.kind, "examples": len(data),
        "seq_len": data.seq_len, "out": str(out), "mode": f"lora-r{cfg.lora_rank}" if cfg.lora_rank else "full",
        "parallel": mode, "world_size": world if mode == "fsdp" else 1, "global_batch": trainer.global_batch,
        "steps": result.steps, "resumed_from": result.resumed_from, "first_loss": round(result.first_loss, 6),
        "last_loss": round(result.last_loss, 6), "tokens_per_s": round(result.tokens_per_s(), 2),
        "losses": [round(s.loss, 6) for s in result.log],
    }
    return summary


def format_summary(summary: dict) -> str:
    """One line for a person: steps, first and last loss, speed, where the model went."""
    return (f"finetune {summary['mode']}: steps {summary['resumed_from']}->{summary['steps']}  loss "
            f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}  {summary['tokens_per_s']:.0f} tokens/s  "
            f"saved to {summary['out']}")

