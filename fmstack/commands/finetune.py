"""`fmstack finetune`: full or LoRA fine-tuning; the options map onto `fmstack.train.command.finetune`."""

from __future__ import annotations

import argparse
import json

from fmstack.commands.common import add_model_args, want_compile
from fmstack.train.command import finetune, format_summary
from fmstack.train.loop import TrainConfig

HELP = "fine-tune a model (full or LoRA) on text / JSONL data; torchrun for data parallel"


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p, model_help="model to fine-tune: registry name or checkpoint path", dtypes=("fp32", "bf16"),
                   dtype_help="weights and optimizer state dtype (bf16 is pure-bf16 training)",
                   compile_help="torch.compile the forward+backward, fullgraph (default: on for CUDA, off for CPU, "
                                "where compiling a model the size of SmolLM2 takes minutes)",
                   parallel=("auto", "none", "fsdp"), parallel_default="auto",
                   parallel_help="data parallel: fsdp shards the model over the ranks of a torchrun job (FSDP2); "
                                 "auto = fsdp under torchrun with several ranks, else none (default auto)",
                   runtime=False)
    p.add_argument("--data", required=True,
                   help=".txt (plain text) or .jsonl (prompt/completion, chat messages, or text per line)")
    p.add_argument("--out", required=True, help="output directory: fmstack checkpoint + train_log.jsonl + "
                                                "train_state.pt (resume)")
    p.add_argument("--lora-rank", type=int, default=None, help="train rank-R LoRA adapters (merged on save) "
                                                               "instead of all weights (default: full fine-tuning)")
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
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default 0.0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--save-every", type=int, default=0,
                   help="write the resume state every N steps (default 0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last stdout line")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                       activation_checkpointing=args.activation_checkpointing, compile=want_compile(args),
                       save_every=args.save_every)


def run(args: argparse.Namespace) -> int:
    summary = finetune(args.model, args.data, args.out, train_config(args), seq_len=args.seq_len, dtype=args.dtype,
                       device=args.device, parallel=args.parallel, resume=args.resume)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0
