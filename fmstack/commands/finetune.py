"""`fmstack finetune`: full or LoRA fine-tuning (the arguments and logic live in `fmstack.train.command`)."""

from __future__ import annotations

import argparse
import json

from fmstack.train import command as finetune

HELP = "fine-tune a model (full or LoRA) on text / JSONL data; torchrun for data parallel"


def configure(p: argparse.ArgumentParser) -> None:
    finetune.configure(p)


def run(args: argparse.Namespace) -> int:
    summary = finetune.run(args)
    print(json.dumps(summary) if args.json else finetune.format_summary(summary))
    return 0
