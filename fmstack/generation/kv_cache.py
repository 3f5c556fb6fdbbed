"""Static (preallocated, contiguous) KV cache for generation.

Layout per layer: k, v `[B, Hkv, S, D]`, S = max sequence length. Row b's token at RoPE position p
lives in slot `p + pad[b]`: batched prompts are left-padded so that every row's next token lands in
the same column, and `pad[b]` (its padding length) hides the padding slots from attention.
Everything is tensor arithmetic on fixed shapes, so prefill and decode compile without graph breaks
and decode steps never recompile.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmstack.config import ModelConfig
from fmstack.models.llama import sdpa


class StaticKVCache(nn.Module):
    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 n_kv_heads: int | None = None, n_layers: int | None = None):
        super().__init__()
        if max_seq_len > config.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context length {config.max_seq_len}")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        n_kv_heads = n_kv_heads or config.n_kv_heads
        n_layers = n_layers or config.n_layers
        shape = (batch_size, n_kv_heads, max_seq_len, config.head_dim)
        for i in range(n_layers):
            self.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pad", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self.n_layers = n_layers

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"k_{layer}"), getattr(self, f"v_{layer}")

    @torch.no_grad()
    def reset(self, pad: Tensor | None = None) -> None:
        """Start new sequences: `pad[b]` left-padding slots for row b (zeros if None). The old K/V need
        no clearing: slots not yet written are masked out."""
        if pad is None:
            self.pad.zero_()
        else:
            self.pad.copy_(pad)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Write k/v `[B, Hkv, T, D]` at slots `positions + pad`, then attend q over the whole cache."""
        B = q.shape[0]
        k_cache, v_cache = self.layer_kv(layer)
        pad = self.pad[:B]
        if B != self.batch_size:
            k_cache, v_cache = k_cache[:B], v_cache[:B]
        slots = positions + pad[:, None]  # [B, T]
        rows = torch.arange(B, device=q.device)[:, None]
        k_cache[rows, :, slots] = k.transpose(1, 2).to(k_cache.dtype)  # [B, T, Hkv, D] into [B, Hkv, S, D]
        v_cache[rows, :, slots] = v.transpose(1, 2).to(v_cache.dtype)
        key_slots = torch.arange(self.max_seq_len, device=q.device)
        q_slots = slots[:, None, :, None]  # [B, 1, T, 1]
        visible = (key_slots <= q_slots) & ((key_slots >= pad[:, None, None, None]) | (key_slots == q_slots))
        return sdpa(q, k_cache, v_cache, mask=visible)
