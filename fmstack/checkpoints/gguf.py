"""GGUF checkpoints (llama.cpp): the header is parsed by `gguf_file`, tensors dequantized by `gguf_quants`,
or kept as their own blocks (`Checkpoint.block_tensor`, `fmstack.quant.gguf_blocks`: --quantize gguf).

Architectures: `llama` (Mistral and Mixtral too: llama.cpp converts them as llama), `qwen2`, `qwen3`, `granite`.
Tensors are dequantized to float32 one at a time; for llama and granite llama.cpp stores attn_q/attn_k
rows in interleaved RoPE order, which is undone here (qwen2/qwen3 use NEOX RoPE: rows as HF's).
`read_gguf_metadata` (and `Checkpoint.metadata`) give every key/value field as plain Python
values, including the `tokenizer.ggml.*` arrays the tokenizer is built from."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from fmstack.checkpoints import gguf_quants
from fmstack.checkpoints.base import rename_tensor, Checkpoint, TensorStream, expected_shapes
from fmstack.checkpoints.gguf_file import GGUFFile, TensorInfo
from fmstack.checkpoints.gguf_quants import can_dequantize
from fmstack.checkpoints.meta import interleaved_to_half
from fmstack.config import ModelConfig, RopeScaling
from fmstack.errors import CheckpointError, ConfigError
from fmstack.models.llama import rope_inv_freq
from fmstack.quant.blocks import BlockWeight
from fmstack.quant.gguf_blocks import gguf_block_weight, keeps_blocks

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "granite")
# llama.cpp runs these with NEOX (rotate-half) RoPE, so its converter leaves q/k rows in HF order.
_NEOX_ARCHITECTURES = ("qwen2", "qwen3")

_GLOBAL = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
           "output.weight": "output.weight"}
_LAYER = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
          "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
          "ffn_down": "feed_forward.w2", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
          "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
          # Mixtral (arch llama): the router, and each projection of all experts stacked `[E, ...]`
          "ffn_gate_inp": "feed_forward.gate", "ffn_gate_exps": "feed_forward.experts.w1",
          "ffn_up_exps": "feed_forward.experts.w3", "ffn_down_exps": "feed_forward.experts.w2"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_name_to_canonical(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `layers.3.attention.wq.weight` (`.bias` likewise); None for others
    (e.g. `rope_freqs.weight`)."""
    return rename_tensor(name, _GLOBAL, _LAYER_RE, _LAYER)


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value fields of a GGUF file as Python values: str for strings, int/float/bool for
    scalars, lists for arrays (e.g. `tokenizer.ggml.tokens` -> list[str], `token_type` -> list[int])."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return GGUFFile(path).fields


def dequantize(t: TensorInfo, file: GGUFFile) -> Tensor:
    """One GGUF tensor -> float32 torch tensor in torch dim order (`[rows, cols]` for matrices)."""
    path = file.path
    if not can_dequantize(t.tensor_type):
        raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantized")
    try:
        return gguf_quants.dequantize(file.raw(t), t.tensor_type, t.shape)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                              "which cannot be dequantized") from None
    except (ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}") from None


def _unpermute(name: str, w: Tensor, config: ModelConfig, arch: str) -> Tensor:
    """Undo llama.cpp's interleaved RoPE row order of attn_q/attn_k (llama, granite) on rows of `w`."""
    heads = config.n_heads if "attn_q" in name else config.n_kv_heads
    if arch not in _NEOX_ARCHITECTURES and name.endswith(("attn_q.weight", "attn_k.weight")) \
            and w.shape[0] % (2 * heads) == 0:
        return interleaved_to_half(w, heads)
    return w


def _block_tensor(file: GGUFFile, by_canon: dict[str, TensorInfo], config: ModelConfig,
                  arch: str) -> Callable[[str], BlockWeight | None]:
    """`Checkpoint.block_tensor` of a GGUF file: its blocks, rows in the model's order."""
    def block_tensor(canon: str) -> BlockWeight | None:
        t = by_canon.get(canon)
        if t is None:
            raise CheckpointError(f"{file.path}: missing tensor {canon}")
        if len(t.shape) != 2 or not keeps_blocks(t.tensor_type):
            return None
        try:
            w = gguf_block_weight(file.raw(t), t.tensor_type, t.shape)
        except ValueError as e:
            raise CheckpointError(f"{file.path}: tensor {t.name}: {e}") from None
        file.release(t)
        fields = [_unpermute(t.name, x, config, arch) if x is not None else None for x in (w.qweight, w.scales, w.mins)]
        return BlockWeight(*fields, w.bits, w.block)
    return block_tensor


def _f32(x: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _get(meta: dict[str, Any], key: str, path: Path, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise ConfigError(f"{path}: GGUF metadata has no {key!r}")
    return default


def _scaling_from_rope_freqs(factors: Tensor, base: ModelConfig, original: int, path: Path) -> RopeScaling | None:
    """Recover Llama-3 RoPE scaling from llama.cpp's `rope_freqs` tensor (per-frequency divisors)."""
    if torch.all(factors == 1):
        return None
    scaling = RopeScaling(factor=float(factors.max()), original_max_position=original)
    implied = rope_inv_freq(base) / rope_inv_freq(base.replace(rope_scaling=scaling))
    if factors.shape != implied.shape or not torch.allclose(factors.float(), implied, rtol=1e-3):
        raise ConfigError(f"{path}: rope_freqs.weight is not Llama-3 RoPE scaling with the usual "
                          "low_freq_factor=1, high_freq_factor=4; unsupported")
    return scaling


def _family_fields(arch: str, k: Callable[..., Any]) -> dict[str, Any]:
    """The ModelConfig family fields of an architecture, from its `{arch}.*` keys (`k(key, default)`)."""
    if arch == "qwen2":
        return {"qkv_bias": True}
    if arch == "qwen3":
        return {"qk_norm": True}
    if arch == "granite":
        scale = k("attention.scale", None)
        return {"embedding_multiplier": _f32(k("embedding_scale", 1.0)),
                "residual_multiplier": _f32(k("residual_scale", 1.0)),
                "attention_multiplier": None if scale is None else _f32(scale),
                "logits_scaling": _f32(k("logit_scale", 1.0))}
    window = k("attention.sliding_window", None)  # llama arch: Mistral files that record their window
    return {} if window is None else {"sliding_window": int(window)}


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, TensorInfo], file: GGUFFile) -> ModelConfig:
    """ModelConfig from GGUF metadata (`{arch}.*` keys) and the tensor table (vocab, tying, rope_freqs)."""
    path = file.path
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise CheckpointError(f"{path}: unknown architecture {arch!r} (supported: {supported})")

    def k(key: str, default: Any = ...) -> Any:
        return _get(meta, f"{arch}.{key}", path, default)

    dim, n_heads = int(k("embedding_length")), int(k("attention.head_count"))
    n_kv = k("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts
        if len(set(n_kv)) != 1:
            raise ConfigError(f"{path}: per-layer head_count_kv {sorted(set(n_kv))} is not supported")
        n_kv = n_kv[0]
    head_dim = int(k("attention.key_length", 0)) or dim // n_heads
    rope_dim = int(k("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConfigError(f"{path}: partial RoPE (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
                          "is not supported")
    vocab = k("vocab_size", None)
    if vocab is None:
        emb = tensors.get("token_embd.weight")
        vocab = emb.shape[0] if emb is not None else len(meta.get("tokenizer.ggml.tokens", []))
    config = ModelConfig(
        name=str(meta.get("general.name") or "gguf"), vocab_size=int(vocab), dim=dim,
        n_layers=int(k("block_count")), n_heads=n_heads, n_kv_heads=int(n_kv),
        ffn_dim=int(k("feed_forward_length")),
        norm_eps=_f32(k("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=_f32(k("rope.freq_base", 10000.0)),
        max_seq_len=int(k("context_length", 2048)), tie_embeddings="output.weight" not in tensors, head_dim=head_dim,
        n_experts=int(k("expert_count", 0)), n_experts_per_token=int(k("expert_used_count", 0)),
        **_family_fields(arch, k),
    )
    scaling_type = k("rope.scaling.type", "none")
    original = int(k("rope.scaling.original_context_length", 8192))
    if scaling_type == "llama3":
        config = config.replace(rope_scaling=RopeScaling(
            factor=float(k("rope.scaling.factor")), low_freq_factor=float(k("rope.scaling.low_freq_factor", 1.0)),
            high_freq_factor=float(k("rope.scaling.high_freq_factor", 4.0)), original_max_position=original))
    elif scaling_type not in ("none", "") and float(k("rope.scaling.factor", 1.0)) != 1.0:
        raise ConfigError(f"{path}: RoPE scaling type {scaling_type!r} is not supported")
    elif "rope_freqs.weight" in tensors:
        factors = dequantize(tensors["rope_freqs.weight"], file)
        config = config.replace(rope_scaling=_scaling_from_rope_freqs(factors, config, original, path))
    return config


def open_gguf(path: Path) -> Checkpoint:
    """Parse the header, build the config, check every tensor's type and shape, return a streaming Checkpoint."""
    file = GGUFFile(path)
    meta = file.fields
    by_name = {t.name: t for t in file.tensors}
    config = config_from_gguf(meta, by_name, file)
    config_arch = meta.get("general.architecture")
    shapes = expected_shapes(config)
    for t in file.tensors:
        canon = gguf_name_to_canonical(t.name)
        if canon is None:
            continue
        if not can_dequantize(t.tensor_type):
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                                  "which cannot be dequantized")
        one = canon.replace(".experts.", ".experts.0.")  # llama.cpp's stacked experts: [E, one expert's shape]
        if one != canon and one in shapes:
            shapes[canon] = (config.n_experts, *shapes[one])
        if canon in shapes and t.shape != shapes[canon]:
            raise CheckpointError(f"{path}: tensor {canon} ({t.name}) has shape {t.shape}, "
                                  f"expected {shapes[canon]}")

    def tensors(names: set[str] | None = None) -> TensorStream:
        for t in file.tensors:
            canon = gguf_name_to_canonical(t.name)
            if canon is None:
                if t.name != "rope_freqs.weight":
                    log.debug("%s: skipping tensor %s", path.name, t.name)
                continue
            stacked = ".experts.w" in canon  # one tensor for all experts: yielded as E per-expert tensors
            parts = ([canon.replace(".experts.", f".experts.{e}.") for e in range(config.n_experts)] if stacked
                     else [canon])
            if names is not None and not names.intersection(parts):
                continue
            w = dequantize(t, file)
            file.release(t)
            if stacked:
                yield from ((n, x) for n, x in zip(parts, w) if names is None or n in names)
                continue
            yield canon, _unpermute(t.name, w, config, config_arch)  # llama.cpp interleaved the RoPE pairs
            del w

    by_canon = {gguf_name_to_canonical(t.name): t for t in file.tensors}
    return Checkpoint(path=path, format="gguf", config=config, tensors=tensors, tokenizer_path=path, metadata=meta,
                      block_tensor=_block_tensor(file, by_canon, config, config_arch))
