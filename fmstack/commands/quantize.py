"""`fmstack quantize`: write a weight-quantized fmstack checkpoint (int8, int4, gptq)."""

from __future__ import annotations

import argparse
import logging

from fmstack.checkpoints.native import save_checkpoint
from fmstack.commands.common import add_model_name_arg
from fmstack.errors import FmstackError
from fmstack.loading import load_model
from fmstack.quant import QuantSpec, quantize_model
from fmstack.quant.gptq import calibration_ids, gptq_quantize

log = logging.getLogger("fmstack")

HELP = "write a weight-quantized checkpoint (int8, int4, gptq)"


def configure(p: argparse.ArgumentParser) -> None:
    add_model_name_arg(p, "model to quantize: registry name or checkpoint path")
    p.add_argument("--mode", required=True, choices=["int8", "int4", "gptq"],
                   help="int8 per channel, int4 group-wise round-to-nearest, or gptq (int4, calibrated)")
    p.add_argument("--group-size", type=int, default=32, help="int4/gptq group size (default 32)")
    p.add_argument("--calib", default=None, help="gptq: calibration text (.txt) or JSONL (ctx/text fields) (default: none; gptq needs it)")
    p.add_argument("--calib-samples", type=int, default=128, help="gptq: calibration windows (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="gptq: tokens per window (default 256)")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--out", required=True, help="output directory (safetensors + config + tokenizer)")


def run(args: argparse.Namespace) -> int:
    spec = QuantSpec(args.mode, args.group_size)
    if args.mode == "gptq" and not args.calib:
        raise FmstackError("--mode gptq needs --calib FILE (any text; e.g. the HellaSwag dev contexts)")
    loaded = load_model(args.model)
    keep: dict = {}
    if args.mode == "gptq":
        if loaded.tokenizer is None:
            raise FmstackError(f"--model {args.model} has no tokenizer to read the calibration text with")
        ids = calibration_ids(loaded.tokenizer, args.calib, n_samples=args.calib_samples, seq_len=args.calib_seq_len)
        gptq_quantize(loaded.model, ids, spec, act_order=args.act_order, keep=keep, head="gptq")
    else:
        quantize_model(loaded.model, spec, keep=keep)
    out = save_checkpoint(args.out, loaded.model, loaded.tokenizer, quantized=keep, source=loaded.source, spec=spec)
    log.info("wrote %s (%s)", out, spec.mode)
    return 0
