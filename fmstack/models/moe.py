"""Mixtral-style sparse mixture-of-experts FFN: a router picks `n_experts_per_token` of `n_experts`
SwiGLU experts per token and mixes their outputs (inference only: no load-balancing loss).

Routing is HF `MixtralSparseMoeBlock`'s: softmax over all router logits in fp32, top-k, the k
weights renormalized to sum to 1 (the same numbers as a softmax over the k chosen logits).

Expert weights are ONE stacked tensor per projection (`w_gate_up` `[E, 2F, dim]`, gate rows
first, and `w_down` `[E, dim, F]`), so a token's experts are found by indexing, not by Python
control flow. Three ways to run them over N tokens, all with the same result:
  grouped   eager: tokens sorted by expert, one matmul per expert over exactly its tokens (the
            FLOPs and weight reads of the chosen experts only; the split sizes are data, read on
            the host, so it is for eager runs only).
  gathered  compiled, N*k <= E (decode): index the stacked weights by each token's chosen experts
            and run one batched matmul; static shapes, reads N*k expert matrices (at most all E).
  dense     compiled, more tokens (prefill): every expert over every token, weighted by a routing
            matrix that is 0 off the chosen experts (E/k times the FLOPs, but static shapes and no
            data-dependent control flow, so no graph breaks).
One token through a Mixtral-shaped layer scaled down (dim 1024, F 3584, 8 experts, top-2, fp32) on
the shared 2-core dev machine (load ~14): eager grouped 246 ms, eager gathered 321 ms (it copies the
chosen experts' weights before the matmul), eager dense 401 ms; compiled gathered 104 ms, compiled
dense 689 ms. 256 tokens, eager: grouped 1.96 s, dense 2.43 s. (Mean of 20 calls of each method,
after a warm-up call; compiled: `torch.compile(method, fullgraph=True)`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmstack.config import ModelConfig


class ExpertLinear(nn.Module):
    """E stacked projections without bias: `weight` `[E, out, in]`. Int8 experts
    (`fmstack.quant.experts.Int8ExpertLinear`) offer the same two calls."""

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))

    def gathered(self, x: Tensor, experts: Tensor) -> Tensor:
        """x `[N, k, in]` through expert `experts[n, j]` for each (n, j) -> `[N, k, out]`."""
        return torch.einsum("nki,nkoi->nko", x, self.weight[experts])

    def expert(self, x: Tensor, e: int) -> Tensor:
        """x `[M, in]` through expert e -> `[M, out]`."""
        return F.linear(x, self.weight[e])


class MoEFeedForward(nn.Module):
    """Sparse MoE SwiGLU FFN (see the module docstring); `gate` is the router `[E, dim]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.ffn_dim = config.n_experts, config.n_experts_per_token, config.ffn_dim
        self.gate = nn.Linear(config.dim, config.n_experts, bias=False)
        self.w_gate_up = ExpertLinear(config.n_experts, config.dim, 2 * config.ffn_dim)
        self.w_down = ExpertLinear(config.n_experts, config.ffn_dim, config.dim)

    def route(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h `[N, dim]` -> (weights `[N, k]` in h's dtype, summing to 1; expert ids `[N, k]`)."""
        probs = F.softmax(self.gate(h).float(), dim=-1)
        top, experts = probs.topk(self.top_k, dim=-1)
        return (top / top.sum(dim=-1, keepdim=True)).to(h.dtype), experts

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, x.shape[-1])
        weights, experts = self.route(h)
        if not torch.compiler.is_compiling():
            out = self.grouped(h, weights, experts)
        elif h.shape[0] * self.top_k <= self.n_experts:
            out = self.gathered(h, weights, experts)
        else:
            out = self.dense(h, weights, experts)
        return out.reshape(x.shape)

    def gathered(self, h: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        x = h[:, None].expand(-1, self.top_k, -1)
        gate, up = self.w_gate_up.gathered(x, experts).chunk(2, dim=-1)
        y = self.w_down.gathered(F.silu(gate) * up, experts)  # [N, k, dim]
        return (y * weights[..., None]).sum(dim=1)

    def _expert_ffn(self, x: Tensor, e: int) -> Tensor:
        gate, up = self.w_gate_up.expert(x, e).chunk(2, dim=-1)
        return self.w_down.expert(F.silu(gate) * up, e)

    def grouped(self, h: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # one host sync per layer
        token = order // self.top_k
        parts = [self._expert_ffn(x, e) for e, x in enumerate(h[token].split(counts)) if counts[e]]
        y = torch.cat(parts) * weights.reshape(-1)[order, None]
        return torch.zeros_like(h).index_add_(0, token, y)

    def dense(self, h: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        mix = torch.zeros(h.shape[0], self.n_experts, dtype=h.dtype, device=h.device).scatter(1, experts, weights)
        out = torch.zeros_like(h)
        for e in range(self.n_experts):
            out = out + mix[:, e, None] * self._expert_ffn(h, e)
        return out
