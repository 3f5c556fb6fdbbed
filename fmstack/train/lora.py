"""LoRA (low-rank adapters), applied to a built model from outside and merged back for saving.

`apply_lora` swaps chosen `nn.Linear` modules for `LoRALinear(base)`: y = base(x) + s * (x A^T) B^T
with A `[r, in]` (small random), B `[out, r]` (zeros, so the adapted model starts equal to the base)
and s = alpha / r. Everything else is frozen. `merge_lora` folds s * B A into the base weight and
puts the plain `nn.Linear` back, so the model saves and loads like any other.

On fmstack's fused projections (`wqkv`, `w_gate_up`) one adapter covers the fused weight: q, k and v
share A (rank r over the concatenation) and each has its own rows of B.

Family parameters outside the projections are frozen with the rest, not adapted: Qwen2's q/k/v bias
(a parameter beside `wqkv`, added after the adapted projection), Qwen3's q/k norm weights, Granite's
multipliers (config constants), and a Mixtral block's router and stacked experts (`ExpertLinear`,
not `nn.Linear`: only its attention projections get adapters). `tests/train/test_families.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmstack.errors import ParameterError

DEFAULT_TARGETS = ("wqkv", "wo", "w_gate_up", "w_down")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        with torch.no_grad():  # kaiming-uniform(a=sqrt(5)) like nn.Linear, drawn from `generator`
            bound = 1.0 / math.sqrt(w.shape[1])
            a = torch.empty(self.lora_a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            self.lora_a.copy_(a)

    def forward(self, x: Tensor) -> Tensor:
        """x `[..., in]` -> `[..., out]`."""
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """base weight + s * B A, in the base dtype (`[out, in]`)."""
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
               seed: int = 0) -> list[str]:
    """Freeze `model` and wrap every `nn.Linear` whose attribute name is in `targets` with a rank-`rank`
    adapter (alpha defaults to 2 * rank). Returns the wrapped module names."""
    if not isinstance(rank, int) or rank < 1:
        raise ParameterError(f"--lora-rank {rank} is invalid: must be an integer >= 1")
    alpha = float(2 * rank if alpha is None else alpha)
    if alpha <= 0:
        raise ParameterError(f"--lora-alpha {alpha} is invalid: must be > 0")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                max_rank = min(child.weight.shape)
                if rank > max_rank:
                    raise ParameterError(f"--lora-rank {rank} is too large for {name}.{child_name} "
                                         f"{tuple(child.weight.shape)}: must be <= {max_rank}")
                setattr(module, child_name, LoRALinear(child, rank, alpha, g))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ParameterError(f"LoRA: no nn.Linear named {', '.join(targets)} found in the model")
    return wrapped


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore the plain `nn.Linear` (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight.copy_(child.merged_weight())
                setattr(module, child_name, child.base)
    return model
