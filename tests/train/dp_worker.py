"""Run by test_dp.py under `torchrun --nproc-per-node 2` (gloo): fine-tune tiny random models with
FSDP2 (`Trainer(parallel="fsdp")`, per-block compiled with aot_eager) and write, from rank 0, each
case's loss curve (the LoRA case through a save + resume half-way) and a few exported (gathered,
LoRA-merged) weights as JSON.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/dp_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from fmstack.loading import load_model
from fmstack.parallel.dist import init_distributed
from fmstack.train.loop import TrainConfig, Trainer

CASES = {  # name: (model, TrainConfig kwargs); batch_size is per rank
    "mha-full": ("random:tiny-mha", dict(steps=4, lr=1e-2, batch_size=2, grad_accum=1)),
    "gqa-lora-accum": ("random:tiny-gqa", dict(steps=4, lr=1e-2, batch_size=1, grad_accum=2, lora_rank=4,
                                               activation_checkpointing=True)),
}
PROBE = ("embed.weight", "layers.1.attn.wqkv.weight", "layers.0.mlp.w_down.weight")


def synthetic(seed: int = 0):
    from fmstack.train.data import IGNORE, TokenDataset

    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 512, (10, 16), generator=g)
    labels = torch.roll(inputs, -1, dims=1)
    labels[:, -1] = IGNORE
    labels[::3, :5] = IGNORE
    return TokenDataset(inputs, labels, "synthetic", "test")


def run_case(spec: str, kw: dict, parallel: str | None, compile: bool, resume_dir: str | None = None) -> dict:
    """Train `steps` steps; with `resume_dir`, stop half-way, save, and continue in a fresh Trainer."""
    def make(compile: bool) -> Trainer:
        cfg = TrainConfig(compile=compile, compile_backend="aot_eager", **kw)
        return Trainer(load_model(spec, seed=1).model, synthetic(), cfg, parallel=parallel)

    t = make(compile)
    half = kw["steps"] // 2 if resume_dir else kw["steps"]
    losses = [t.train_step().loss for _ in range(half)]
    if resume_dir:
        t.save_state(resume_dir)
        if parallel:
            dist.barrier()
        t = make(False)
        assert t.load_state(resume_dir) and t.step == half
        losses += [t.train_step().loss for _ in range(kw["steps"] - half)]
    plain = t.export_model()
    probe = {n: p.flatten()[:64].tolist() for n, p in plain.named_parameters() if n in PROBE} if plain else {}
    return {"losses": losses, "probe": probe, "global_batch": t.global_batch}


def main() -> None:
    init_distributed("cpu")
    out = {}
    for name, (spec, kw) in CASES.items():  # the LoRA case also saves and resumes half-way
        resume = sys.argv[1] + ".state" if "lora" in name else None
        out[name] = run_case(spec, kw, "fsdp", compile=True, resume_dir=resume)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
