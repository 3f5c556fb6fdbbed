"""Int8 weight-only MoE experts: the stacked expert projections of `fmstack.models.moe` with one
symmetric scale per expert and output channel (portable form: qweight int8 `[E, N, K]`, scales
`[E, N]`; w[e] ~= q[e] * scales[e][:, None], the int8 Linear rule per expert).

The gathered (decode) matmul indexes the int8 weights by each token's experts, converts only
those to the run dtype and applies the scales to the outputs; one expert over its tokens (prefill)
converts that expert and runs BLAS. Not `ops.int8_mm`: its eager CPU kernel is compiled per
row-count class, and the per-expert token counts of prefill vary call to call (they exhausted
Dynamo's recompile limit on the first tiny-moe prompts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Int8ExpertLinear(nn.Module):
    """Drop-in for `fmstack.models.moe.ExpertLinear` holding int8 weights and per-channel scales."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.register_buffer("weight", torch.empty(n_experts, out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("scales", torch.empty(n_experts, out_features, dtype=dtype, device=device))

    @classmethod
    def from_portable(cls, qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> "Int8ExpertLinear":
        m = cls(*qweight.shape[:1], qweight.shape[2], qweight.shape[1], dtype, device=qweight.device)
        m.weight.copy_(qweight)
        m.scales.copy_(scales)
        return m

    def gathered(self, x: Tensor, experts: Tensor) -> Tensor:
        """x `[N, k, in]` through expert `experts[n, j]` for each (n, j) -> `[N, k, out]`."""
        out = torch.einsum("nki,nkoi->nko", x, self.weight[experts].to(x.dtype))
        return out * self.scales[experts].to(x.dtype)

    def expert(self, x: Tensor, e: int) -> Tensor:
        """x `[M, in]` through expert e -> `[M, out]`."""
        return F.linear(x, self.weight[e].to(x.dtype)) * self.scales[e].to(x.dtype)
