"""Static (preallocated, contiguous) KV cache for generation, and the buffers every KV cache shares.

Layout per layer: k, v `[B, Hkv, S, D]`, S = max sequence length. Row b's token at RoPE position p
lives in slot `p + pad[b]`: batched prompts are left-padded so that every row's next token lands in
the same column, and `pad[b]` (its padding length) hides the padding slots from attention.
Everything is tensor arithmetic on fixed shapes, so prefill and decode compile without graph breaks
and decode steps never recompile.

`LayerKVBuffers` (per-layer `k_i`/`v_i` buffers, `layer_kv`, `nbytes`) and `PaddedKVCache` (plus the
per-row left padding, `reset`) are the pieces the static cache, the context-parallel `RingKVCache`
and the serving `PagedKVCache` have in common, written once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmstack import native
from fmstack.backends import known_at_most
from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.models.llama import causal_window_mask, sdpa

# Query tokens up to which a CPU step attends with fmstack's native kernel (decode, speculative
# verification) instead of SDPA: it reads only the visible keys, where SDPA's CPU kernel takes the
# whole allocation. SmolLM2-135M, one decode token over a 256-slot cache with 192 filled, one layer:
# 16.5 us against 38.4 us (1 thread, eager; benchmarks/results/decode_attention_cpu.json).
NATIVE_ATTENTION_MAX_TOKENS = 16


class LayerKVBuffers(nn.Module):
    """Per-layer key and value buffers `k_i`, `v_i` of one `shape` (not saved in state dicts)."""

    def __init__(self, n_layers: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.n_layers = n_layers
        for i in range(n_layers):
            self.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"k_{layer}"), getattr(self, f"v_{layer}")

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers (K/V and any bookkeeping buffers a subclass adds)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class PaddedKVCache(LayerKVBuffers):
    """`LayerKVBuffers` for `batch_size` rows of up to `max_seq_len` tokens, with `pad [B]`: row b's
    left-padding length, set by `reset` when new sequences start."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, shape: tuple[int, ...],
                 n_layers: int, dtype: torch.dtype, device: torch.device | str):
        if max_seq_len > config.max_seq_len:
            raise ParameterError(f"max_seq_len={max_seq_len} exceeds the model's context length {config.max_seq_len}")
        super().__init__(n_layers, shape, dtype, device)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.register_buffer("pad", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)

    @torch.no_grad()
    def reset(self, pad: Tensor | None = None) -> None:
        """Start new sequences: `pad[b]` left-padding slots for row b (zeros if None)."""
        if pad is None:
            self.pad.zero_()
        else:
            self.pad.copy_(pad)


def attend_static(k_cache: Tensor, v_cache: Tensor, pad: Tensor, sliding_window: int | None, q: Tensor, k: Tensor,
                  v: Tensor, positions: Tensor) -> Tensor:
    """Write k/v `[B, Hkv, T, D]` at slots `positions + pad` of one layer's `k_cache`/`v_cache`
    `[B', Hkv, S, D]` (the first B rows are used), then attend q over the whole cache."""
    B = q.shape[0]
    pad = pad[:B]
    if B != k_cache.shape[0]:
        k_cache, v_cache = k_cache[:B], v_cache[:B]
    slots = positions + pad[:, None]  # [B, T]
    rows = torch.arange(B, device=q.device)[:, None]
    k_cache[rows, :, slots] = k.transpose(1, 2).to(k_cache.dtype)  # [B, T, Hkv, D] into [B, Hkv, S, D]
    v_cache[rows, :, slots] = v.transpose(1, 2).to(v_cache.dtype)
    key_slots = torch.arange(k_cache.shape[2], device=q.device)
    q_slots = slots[:, None, :, None]  # [B, 1, T, 1]
    visible = causal_window_mask(key_slots, q_slots, sliding_window)  # slot - pad = position
    visible = visible & ((key_slots >= pad[:, None, None, None]) | (key_slots == q_slots))
    return attend_visible(q, k_cache, v_cache, visible)


def attend_visible(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """Attention of q `[B, H, T, D]` over k, v `[B, Hkv, S, D]` where `visible` `[B, 1, T, S]`: the native
    kernel for a few float32 query tokens on CPU without autograd (`NATIVE_ATTENTION_MAX_TOKENS`), else SDPA."""
    # known_at_most: the prefill graph's symbolic length takes SDPA without a guard (a `<= 16` guard would
    # compile a second graph past it)
    if (q.device.type == "cpu" and known_at_most(q.shape[2], NATIVE_ATTENTION_MAX_TOKENS)
            and q.dtype == k.dtype == torch.float32
            and not (torch.is_grad_enabled() and q.requires_grad) and native.available()):
        return native.decode_attention(q, k, v, visible, q.shape[-1] ** -0.5)
    return sdpa(q, k, v, mask=visible)


class StaticLayer(nn.Module):
    """One layer of a `StaticKVCache` as a module of its own (`models.llama.LayerCache`): its k/v
    buffers and the cache's `pad`, shared, not copied. Every layer's view has the same structure, so a
    compile region over the blocks (`models.llama.run_block`) traces and builds one block for all."""

    def __init__(self, k: Tensor, v: Tensor, pad: Tensor, sliding_window: int | None):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.register_buffer("pad", pad, persistent=False)
        self.sliding_window = sliding_window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        return attend_static(self.k, self.v, self.pad, self.sliding_window, q, k, v, positions)


class StaticKVCache(PaddedKVCache):
    """k, v `[B, Hkv, S, D]` per layer (see the module docstring). `reset` needs no clearing of the
    old K/V: slots not yet written are masked out. `layer_views`: one `StaticLayer` per layer (a
    tuple, not submodules: the buffers are the cache's own); None for sliding-window models."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 n_kv_heads: int | None = None, n_layers: int | None = None):
        shape = (batch_size, n_kv_heads or config.n_kv_heads, max_seq_len, config.head_dim)
        super().__init__(config, batch_size, max_seq_len, shape, n_layers or config.n_layers, dtype, device)
        self.sliding_window = config.sliding_window
        # No views with a sliding window: torch 2.13's Dynamo fails on that region in the dynamic-length
        # prefill (InternalTorchDynamoError KeyError, tests/models/test_families.py mistral); those
        # models compile every layer inline, as before
        self.layer_views = None if self.sliding_window is not None else tuple(
            StaticLayer(*LayerKVBuffers.layer_kv(self, i), self.pad, self.sliding_window) for i in range(self.n_layers))

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Write k/v `[B, Hkv, T, D]` at slots `positions + pad`, then attend q over the whole cache."""
        k_cache, v_cache = self.layer_kv(layer)
        return attend_static(k_cache, v_cache, self.pad, self.sliding_window, q, k, v, positions)
