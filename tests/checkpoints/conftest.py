"""Shared helpers for checkpoint tests: tiny random HF models, writers for Meta and GGUF files, and
building our model from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fmstack.checkpoints import hf_name_to_canonical, load_weights, open_checkpoint
from fmstack.checkpoints.meta import half_to_interleaved
from fmstack.models.llama import Transformer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# name -> LlamaConfig kwargs. ffn sizes follow Meta's rule for dim 64 (see meta_params).
HF_CONFIGS = {
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=160, num_hidden_layers=2,
                     tie_word_embeddings=True, rope_theta=10000.0),
    "gqa-untied": dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=192, num_hidden_layers=3,
                       tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=160, num_hidden_layers=2,
                       tie_word_embeddings=False, rope_theta=10000.0),
}


def make_hf_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    """A random fp32 HF Llama (hidden 64, vocab 512) with O(1) logits and non-trivial norms."""
    kw = dict(HF_CONFIGS[name])
    theta, scaling = kw.pop("rope_theta"), kw.pop("rope_scaling", None)
    rope = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, max_position_embeddings=16384, rms_norm_eps=1e-6,
                      rope_parameters=rope, attn_implementation="eager", **kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if n.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model


def hf_canonical_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """HF state dict under canonical names (rotate-half q/k), lm_head dropped when tied."""
    out = {}
    for n, t in model.state_dict().items():
        c = hf_name_to_canonical(n)
        if c is not None and not (c == "output.weight" and model.config.tie_word_embeddings):
            out[c] = t.detach().clone()
    return out


def random_tokens(batch: int = 2, length: int = 16, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits


@torch.no_grad()
def our_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    load_weights(model, ckpt)
    return model.eval()(tokens)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- Meta writer ----------------------------------------------------------------------------------

def meta_params(model: LlamaForCausalLM) -> dict:
    c = model.config
    scaled = (c.rope_parameters or {}).get("rope_type") == "llama3"
    # Meta's ffn rule for dim 64: int(2*256/3)=170 -> *0.9=153 -> round up to 32: 160; or no multiplier: 192.
    mult = 0.9 if c.intermediate_size == 160 else None
    return {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
            "n_kv_heads": c.num_key_value_heads, "vocab_size": -1, "multiple_of": 32, "ffn_dim_multiplier": mult,
            "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"], "use_scaled_rope": scaled}


# Meta model-parallel split dims (None = replicated); tok_embeddings differs between Llama 2 and 3.
_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def write_meta(model: LlamaForCausalLM, path: Path, shards: int = 1, emb_split_dim: int = 1) -> Path:
    """Write params.json + consolidated.NN.pth the way Meta's releases lay them out (interleaved q/k)."""
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    state = hf_canonical_state(model)
    state.setdefault("output.weight", state["tok_embeddings.weight"].clone())  # Meta models are untied
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, t in state.items():
        if name.endswith("wq.weight"):
            t = half_to_interleaved(t, c.num_attention_heads)
        elif name.endswith("wk.weight"):
            t = half_to_interleaved(t, c.num_key_value_heads)
        short = name.split(".")[-2]
        dim = emb_split_dim if short == "tok_embeddings" else _SPLIT.get(short)
        for i, piece in enumerate(t.chunk(shards, dim=dim) if dim is not None else [t] * shards):
            pieces[i][name] = piece.clone()  # own storage, so torch.save writes only this piece
    for i, sd in enumerate(pieces):
        sd["rope.freqs"] = torch.ones(c.hidden_size // c.num_attention_heads // 2)
        torch.save(sd, path / f"consolidated.{i:02d}.pth")
    (path / "params.json").write_text(json.dumps(meta_params(model)))
    return path


# ---- GGUF writer ----------------------------------------------------------------------------------

_GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
               "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
               "feed_forward.w2": "ffn_down", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(canonical: str) -> str:
    stem = canonical.removesuffix(".weight")
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{_GGUF_NAMES[rest]}.weight"
    return f"{_GGUF_NAMES[stem]}.weight"


def llama3_rope_factors(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor for Llama-3 scaling (per-frequency divisors)."""
    out = []
    low_wl, high_wl = s["original_max_position_embeddings"] / s["low_freq_factor"], \
        s["original_max_position_embeddings"] / s["high_freq_factor"]
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
                (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def add_gguf_tensor(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    """Add `arr` (float32, torch dim order) encoded as `qtype` (1-D tensors stay F32, as llama.cpp does)."""
    QT = gguf.GGMLQuantizationType
    if arr.ndim == 1 or qtype == QT.F32:
        w.add_tensor(name, arr.astype(np.float32))
    elif qtype == QT.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        q = gguf.quants.quantize(arr.astype(np.float32), qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)


def gguf_writer(c, path: Path, arch: str, head_dim: int) -> gguf.GGUFWriter:
    """A GGUFWriter holding the hyper-parameters of HF config `c` and a placeholder gpt2 vocabulary."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    return w


def write_gguf(model: LlamaForCausalLM, path: Path, qtype=gguf.GGMLQuantizationType.F32, arch: str = "llama",
               extra_tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None) -> Path:
    """Write a llama GGUF the way llama.cpp's converter does (q/k rows interleaved per head)."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf_writer(c, path, arch, head_dim)
    if (c.rope_parameters or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, c.rope_parameters["rope_theta"],
                                                               c.rope_parameters))
    for name, t in hf_canonical_state(model).items():
        if name.endswith("wq.weight"):
            t = half_to_interleaved(t, c.num_attention_heads)
        elif name.endswith("wk.weight"):
            t = half_to_interleaved(t, c.num_key_value_heads)
        add_gguf_tensor(w, gguf_name(name), t.numpy(), qtype)
    for name, (arr, qt) in (extra_tensors or {}).items():
        w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def hf_models() -> dict[str, LlamaForCausalLM]:
    return {name: make_hf_model(name) for name in HF_CONFIGS}


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    return random_tokens()
