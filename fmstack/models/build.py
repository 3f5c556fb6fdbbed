"""Model construction without a throw-away initialization: built on the meta device, then given
real (uninitialized) storage once, in the run dtype, on the run device, so loading a checkpoint
holds about one copy of the weights (a CPU-initialized fp32 copy first would double the peak and
spend seconds on random init the checkpoint then overwrites)."""

from __future__ import annotations

import torch
from torch import nn

from fmstack.config import ModelConfig
from fmstack.models.llama import Transformer


def build_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build on the meta device and materialize (uninitialized) parameters directly on `device`."""
    model = build_meta(config, dtype).to_empty(device=device)
    model.tie_weights()
    return model


def build_meta(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model on the meta device (no storage): for loaders that replace or materialize parts of it."""
    with torch.device("meta"):
        return Transformer(config).to(dtype)


def materialize_meta(model: nn.Module, device: torch.device) -> None:
    """Give every parameter still on the meta device real (uninitialized) storage on `device`."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
