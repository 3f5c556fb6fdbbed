"""The LLaMA-family decoder: plain PyTorch modules, single device.

Shapes: B batch, T tokens in this call, S cache length, H query heads, Hkv key/value heads,
D head_dim, V vocab. Positions are absolute RoPE positions `[B, T]` (int64).

Attention goes through one small interface, `AttentionCache.attend`: the cache stores the new
keys/values where `positions` say and returns the attention output. The static cache
(generation), the paged cache (serving) and ring attention (context parallel) implement it;
`cache=None` means plain causal attention over the call's own tokens. A block sees one layer of it
(`LayerCache`: `CacheLayer(cache, layer)`, or the cache's own `layer_views`). A cache with
`layer_views` (per-layer modules that hold that layer's K/V tensors) gets the blocks run as one
compile region (`fmstack.backends.compile_region`): every block is then the same graph with other
tensors, so torch.compile traces and builds one block for all layers instead of each layer anew
(see docs/compile.md for the measured compile times).
Projections are fused (`wqkv`, `w_gate_up`) so batch-1 decode runs 4 GEMVs per layer, not 7.

Other LLaMA-shaped families are config fields on this one model, not subclasses (defaults = LLaMA):
`qkv_bias` (Qwen2: a bias on the fused q/k/v projection), `qk_norm` (Qwen3: `HeadNorm`, RMSNorm over
head_dim on q and k before RoPE), Granite's four multipliers (embedding, residual, attention scale,
logits divisor), and `sliding_window` (Mistral: `causal_window_mask`, used by every cache's mask).
A config with `n_experts` gets the sparse MoE FFN of `fmstack.models.moe` in every block.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmstack.backends import compile_region
from fmstack.config import ModelConfig
from fmstack.models.moe import MoEFeedForward


def scale_embeddings(x: Tensor, config: ModelConfig) -> Tensor:
    """Token embeddings times Granite's `embedding_multiplier` (unchanged at 1.0)."""
    return x if config.embedding_multiplier == 1.0 else x * config.embedding_multiplier


def scale_logits(logits: Tensor, config: ModelConfig) -> Tensor:
    """Logits divided by Granite's `logits_scaling` (unchanged at 1.0)."""
    return logits if config.logits_scaling == 1.0 else logits / config.logits_scaling


class AttentionCache(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q `[B, H, T, D]`, k/v `[B, Hkv, T, D]` (RoPE applied), positions `[B, T]` -> `[B, H, T, D]`."""
        ...


class LayerCache(Protocol):
    """One layer of an `AttentionCache`, what a block attends through."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor: ...


class CacheLayer:
    """Layer `layer` of `cache`: `attend(q, k, v, positions)` is `cache.attend(layer, q, k, v, positions)`."""

    __slots__ = ("cache", "layer")

    def __init__(self, cache: AttentionCache, layer: int):
        self.cache, self.layer = cache, layer

    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        return self.cache.attend(self.layer, q, k, v, positions)


def layer_cache(cache: AttentionCache | None, layer: int) -> LayerCache | None:
    """What block `layer` attends through: None (no cache) or `CacheLayer(cache, layer)`."""
    return None if cache is None else CacheLayer(cache, layer)


def fold_gqa(q: Tensor, n_kv_heads: int) -> Tensor:
    """q `[B, H, T, D]` -> `[B, Hkv, G*T, D]`, G = H/Hkv: the G query heads that share a kv head become
    one longer query (row g*T + t is head hkv*G + g, token t). Attention rows are independent, so
    attending the folded query over k/v `[B, Hkv, S, D]` gives the same numbers as GQA."""
    B, H, T, D = q.shape
    return q.reshape(B, n_kv_heads, (H // n_kv_heads) * T, D)


def unfold_gqa(out: Tensor, n_heads: int) -> Tensor:
    """Inverse of `fold_gqa` for outputs `[B, Hkv, G*T, ...]` -> `[B, H, T, ...]` (any trailing dims)."""
    B, Hkv, GT = out.shape[:3]
    G = n_heads // Hkv
    return out.reshape(B, n_heads, GT // G, *out.shape[3:])


def fold_gqa_mask(mask: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """A mask broadcastable to `[B, H, T, S]` -> one broadcastable to `[B, Hkv, G*T, S]`, matching
    `fold_gqa`. A mask shared by all heads (head dim 1) is repeated over the G groups (a view for T=1)."""
    G = n_heads // n_kv_heads
    mask = mask if mask.dim() == 4 else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    Bm, Hm, T, S = mask.shape
    if Hm == 1:
        return mask[:, :, None].expand(Bm, 1, G, T, S).reshape(Bm, 1, G * T, S)
    return mask.expand(Bm, n_heads, T, S).reshape(Bm, n_kv_heads, G * T, S)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """scaled_dot_product_attention with grouped-query heads (k/v have H/Hkv times fewer heads).

    Masked GQA calls fold the query groups into the query length (`fold_gqa`) instead of passing
    `enable_gqa`: CUDA's flash kernel takes no mask and (torch 2.11) the efficient kernel has no GQA,
    so a masked `enable_gqa` call fell to the math backend, which copies K/V with `repeat_interleave`
    in every layer at every decode step. Folded, the efficient (or cuDNN) kernel runs it on the
    kv heads as they are. Unmasked calls (plain causal) keep `enable_gqa`: a causal mask over the
    folded length would be wrong, and flash supports GQA."""
    H, Hkv = q.shape[1], k.shape[1]
    if H == Hkv or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=H != Hkv)
    if is_causal:
        raise ValueError("sdpa: pass either a mask or is_causal, not both")
    out = F.scaled_dot_product_attention(fold_gqa(q, Hkv), k, v, attn_mask=fold_gqa_mask(mask, H, Hkv))
    return unfold_gqa(out, H)


def sdpa_backend_name(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> str:
    """The SDPA backend that `sdpa(q, k, v, mask, is_causal)` would run now (under the enabled
    `sdpa_kernel` backends): 'flash' | 'efficient' | 'math' | 'cudnn' on CUDA, 'flash (cpu)' | 'math'
    on CPU. CUDA asks torch's own checks (`can_use_*_attention`) on the arguments `sdpa` passes, in
    torch's default priority order (flash, efficient, math, cudnn); benchmarks record it with
    their results. 'none' when no enabled backend can run them."""
    H, Hkv = q.shape[1], k.shape[1]
    gqa = H != Hkv
    if gqa and mask is not None:
        q, mask, gqa = fold_gqa(q, Hkv), fold_gqa_mask(mask, H, Hkv), False
    cuda = torch.backends.cuda
    if q.device.type != "cuda":
        usable = q.dim() == 4 and q.dtype == k.dtype == v.dtype and q.is_floating_point()
        if cuda.flash_sdp_enabled() and usable:
            return "flash (cpu)"
        return "math" if cuda.math_sdp_enabled() else "none"
    if mask is not None and mask.dtype == torch.bool:  # as SDPA does before it chooses: an additive mask
        mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf)
    params = cuda.SDPAParams(q, k, v, mask, 0.0, is_causal, gqa)
    checks = [("flash", cuda.flash_sdp_enabled, cuda.can_use_flash_attention),
              ("efficient", cuda.mem_efficient_sdp_enabled, cuda.can_use_efficient_attention),
              ("math", cuda.math_sdp_enabled, lambda _p: True),
              ("cudnn", cuda.cudnn_sdp_enabled, cuda.can_use_cudnn_attention)]
    for name, enabled, can_use in checks:
        if enabled() and can_use(params):
            return name
    return "none"


def causal_window_mask(key_pos: Tensor, query_pos: Tensor, window: int | None) -> Tensor:
    """Which keys a query may see: `key_pos <= query_pos`, and with a sliding `window` only the last
    `window` positions (`key_pos > query_pos - window`, the query itself included), as HF's Mistral.
    Broadcasts like `key_pos <= query_pos`; tensor ops only, so it compiles without guards on values."""
    visible = key_pos <= query_pos
    if window is not None:
        visible = visible & (key_pos > query_pos - window)
    return visible


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> Tensor:
    """Inverse RoPE frequencies `[D/2]` (fp32), with Llama-3.1 scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin `[B, 1, T, D]` for rotate-half RoPE, computed in fp32 and cast to `dtype`."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class HeadNorm(RMSNorm):
    """Qwen3's q/k norm: RMSNorm over head_dim of `[B, heads, T, D]`, one weight `[D]` shared by all heads."""


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        self.wqkv = nn.Linear(config.dim, config.q_dim + 2 * config.kv_dim, bias=False)
        self.wo = nn.Linear(config.q_dim, config.dim, bias=False)
        # Qwen2's q/k/v bias is a parameter of its own, not wqkv's: int8/int4 modules and LoRA wrappers
        # that replace wqkv then keep it without knowing about biases.
        self.qkv_bias = nn.Parameter(torch.zeros(config.q_dim + 2 * config.kv_dim)) if config.qkv_bias else None
        self.q_norm = HeadNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = HeadNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        # Granite's attention scale replaces SDPA's 1/sqrt(D): pre-scaling q keeps the `attend` seam as is.
        m = config.attention_multiplier
        self.q_scale = None if m is None else m * math.sqrt(config.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                cache: LayerCache | None) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.wqkv(x)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_scale is not None:
            q = q * self.q_scale
        if cache is None and self.sliding_window is None:
            out = sdpa(q, k, v, is_causal=True)
        elif cache is None:
            pos = torch.arange(T, device=q.device)
            out = sdpa(q, k, v, mask=causal_window_mask(pos, pos[:, None], self.sliding_window))
        else:
            out = cache.attend(q, k, v, positions)
        return self.wo(out.transpose(1, 2).reshape(B, T, q_dim))


class FeedForward(nn.Module):
    """SwiGLU: w_down(silu(gate(x)) * up(x)); gate and up fused in one `[2F, dim]` weight."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ffn_dim = config.ffn_dim
        self.w_gate_up = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoEFeedForward(config) if config.n_experts else FeedForward(config)
        self.residual_multiplier = config.residual_multiplier  # Granite scales each branch; 1.0 elsewhere

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                cache: LayerCache | None) -> Tensor:
        m = self.residual_multiplier
        attn = self.attn(self.attn_norm(x), cos, sin, positions, cache)
        x = x + (attn if m == 1.0 else attn * m)
        mlp = self.mlp(self.mlp_norm(x))
        return x + (mlp if m == 1.0 else mlp * m)


@compile_region
def run_block(block: Block, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache: LayerCache) -> Tensor:
    """`block(...)` as a compile region: under torch.compile every call with the same shapes reuses
    one traced and built graph (eager: a plain call)."""
    return block(x, cos, sin, positions, cache)


class Transformer(nn.Module):
    """The single-device model; a `fmstack.models.protocol.CausalLM` (tensor parallel swaps its modules)."""

    compiles_whole = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output projection with the embedding when the config says so (call after to_empty)."""
        if self.config.tie_embeddings and isinstance(self.output, nn.Linear):
            self.output.weight = self.embed.weight

    def make_cache(self, batch_size: int, max_seq_len: int, static: Callable[..., AttentionCache],
                   **kw) -> AttentionCache:
        """`static(config, ...)` (the generation cache class) for every layer, with this model's kv heads."""
        return static(self.config, batch_size, max_seq_len, n_kv_heads=self.layers[0].attn.n_kv_heads, **kw)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (benchmarks, tests): normal(0, std) matrices, unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None,
                      cache: AttentionCache | None = None) -> Tensor:
        """tokens `[B, T]` -> final normed hidden states `[B, T, dim]`."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        x = scale_embeddings(self.embed(tokens), self.config)
        inv_freq = rope_inv_freq(self.config, device=tokens.device)
        cos, sin = rope_cos_sin(inv_freq, positions, x.dtype)
        views = getattr(cache, "layer_views", None)
        for i, block in enumerate(self.layers):
            if views is None:
                x = block(x, cos, sin, positions, layer_cache(cache, block.attn.layer))
            else:  # the layer's K/V as module inputs: one compiled block graph serves every layer
                x = run_block(block, x, cos, sin, positions, views[i])
        return self.norm(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: AttentionCache | None = None,
                last_only: bool = False) -> Tensor:
        """tokens `[B, T]` -> logits `[B, T, V]` (`[B, 1, V]` with last_only), in the model dtype."""
        h = self.hidden_states(tokens, positions, cache)
        if last_only:
            h = h[:, -1:]
        return scale_logits(self.output(h), self.config)
