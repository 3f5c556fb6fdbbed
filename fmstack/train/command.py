"""Fine-tuning as one call: load the model and data, train (one process or FSDP2 under torchrun),
save the checkpoint, return a summary. Takes plain values; `fmstack finetune`
(fmstack/commands/finetune.py) maps its options onto them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fmstack.errors import ParameterError
from fmstack.train.loop import TrainConfig

log = logging.getLogger("fmstack.finetune")


def parallel_mode(parallel: str, world: int) -> str:
    """'auto' -> fsdp under torchrun with several ranks, else none; refuses none with several ranks."""
    mode = ("fsdp" if world > 1 else "none") if parallel == "auto" else parallel
    if mode == "none" and world > 1:
        raise ParameterError("--parallel none under torchrun with several ranks would train copies side by side; "
                             "use --parallel fsdp (or auto)")
    return mode


def finetune(model: str, data: str, out: str | Path, cfg: TrainConfig, *, seq_len: int | None = None,
             dtype: str = "fp32", device: str = "cpu", parallel: str = "auto", resume: bool = False) -> dict:
    """Fine-tune `model` on `data` as `cfg` says, save to `out`, and return the run's summary.

    One piece because the FSDP path must share a failure on any rank (load, data, --out checks)
    with the others before they all enter the collective barrier."""
    import torch

    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.loading import load_model, parse_device
    from fmstack.parallel import dist as fdist
    from fmstack.train.data import load_dataset
    from fmstack.train.loop import STATE_FILE, Trainer

    cfg.check()
    dev = parse_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1")) if fdist.launched_by_torchrun() else 1
    mode = parallel_mode(parallel, world)
    out = Path(out)
    error, rank = None, 0
    if mode == "fsdp":
        info = fdist.init_distributed(dev)
        dev, rank = info.device, info.rank
    try:
        if out.exists() and not out.is_dir():
            raise ParameterError(f"--out {out}: exists and is not a directory")
        if (out / STATE_FILE).is_file() and not resume:
            raise ParameterError(f"--out {out} already holds a training run ({STATE_FILE}); pass --resume to "
                                 "continue it or choose another --out")
        loaded = load_model(model, device=dev, dtype=dtype, seed=cfg.seed)
        dataset = load_dataset(data, loaded.tokenizer, seq_len, loaded.config.max_seq_len)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        if mode != "fsdp":
            raise
        error = e
    if mode == "fsdp":
        fdist.fail_together(error)
        torch.distributed.barrier()
    trainer = Trainer(loaded.model, dataset, cfg, device=dev, parallel=mode if mode == "fsdp" else None)
    if resume and not trainer.load_state(out):
        log.info("--resume: no %s in %s; starting from step 0", STATE_FILE, out)
    result = trainer.fit(out, progress=True)
    trained = trainer.export_model()
    if trained is not None:
        save_checkpoint(out, trained, loaded.tokenizer, source=loaded.source)
    return {
        "model": model, "model_path": loaded.source, "data": dataset.source, "data_kind": dataset.kind,
        "examples": len(dataset), "seq_len": dataset.seq_len, "out": str(out),
        "mode": f"lora-r{cfg.lora_rank}" if cfg.lora_rank else "full", "parallel": mode,
        "world_size": world if mode == "fsdp" else 1, "global_batch": trainer.global_batch,
        "steps": result.steps, "resumed_from": result.resumed_from, "first_loss": round(result.first_loss, 6),
        "last_loss": round(result.last_loss, 6), "tokens_per_s": round(result.tokens_per_s(), 2),
        "losses": [round(s.loss, 6) for s in result.log],
    }


def format_summary(summary: dict) -> str:
    """One line for a person: steps, first and last loss, speed, where the model went."""
    return (f"finetune {summary['mode']}: steps {summary['resumed_from']}->{summary['steps']}  loss "
            f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}  {summary['tokens_per_s']:.0f} tokens/s  "
            f"saved to {summary['out']}")
