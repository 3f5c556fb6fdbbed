"""Data-parallel training with FSDP2 (`fully_shard`), beside the inference plans: every block is
sharded on its own, then the root (embedding, final norm, head), so a forward all-gathers one block's
parameters at a time and backward reduce-scatters its gradients. With compilation each block's
forward is compiled (fullgraph) before sharding, so FSDP's all-gather/reduce-scatter hooks stay
outside the graphs; embedding, head and loss run eagerly."""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block's forward (fullgraph) in place."""
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False, backend=backend)


def apply_fsdp(model: nn.Module, compile_backend: str | None = None) -> nn.Module:
    """Shard `model` (a `Transformer` on this rank's device, in a joined process group) in place;
    `compile_backend`: compile each block with it first (None: eager)."""
    from torch.distributed.fsdp import fully_shard

    if compile_backend is not None:
        compile_blocks(model, compile_backend)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model
