"""GGUF files of the other families, written as llama.cpp's converter writes them (arch `qwen2`,
`qwen3`, `granite`; Mistral as arch `llama` with its window in `llama.attention.sliding_window`),
load to the same config and logits as the HF directory of the same random model (fp32, rtol/atol 1e-5).
Mixtral as arch `llama` with stacked expert tensors (`ffn_*_exps`) and the `ffn_gate_inp` router: HF's logits."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from fmstack.checkpoints import open_checkpoint
from fmstack.checkpoints.base import load_weights
from fmstack.checkpoints.hf import hf_name_to_canonical
from fmstack.checkpoints.meta import half_to_interleaved
from fmstack.models.build import build_model
from tests.checkpoints.conftest import add_gguf_tensor, gguf_writer
from tests.models.test_families import FAMILIES, hf_family_model

TOL = dict(rtol=1e-5, atol=1e-5)
ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "granite": "granite", "mistral": "llama"}
_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
          "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
          "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
          "feed_forward.w2": "ffn_down", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
          "attention.q_norm": "attn_q_norm", "attention.k_norm": "attn_k_norm"}


def gguf_tensor_name(canonical: str) -> str:
    stem, kind = canonical.rsplit(".", 1)
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{_NAMES[rest]}.{kind}"
    return f"{_NAMES[stem]}.{kind}"


def _family_keys(w: gguf.GGUFWriter, family: str, c) -> None:
    if family == "granite":
        w.add_embedding_scale(c.embedding_multiplier)
        w.add_residual_scale(c.residual_multiplier)
        w.add_attention_scale(c.attention_multiplier)
        w.add_logit_scale(c.logits_scaling)
    if family == "mistral":
        w.add_sliding_window(c.sliding_window)


def write_family_gguf(hf, family: str, path: Path) -> Path:
    """F32 GGUF of `hf`; q/k rows interleaved per head except for the NEOX-RoPE archs (qwen2, qwen3)."""
    c, arch = hf.config, ARCH[family]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf_writer(c, path, arch, head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    _family_keys(w, family, c)
    for name, t in hf.state_dict().items():
        canon = hf_name_to_canonical(name)
        if canon is None or (canon == "output.weight" and c.tie_word_embeddings):
            continue
        if arch not in ("qwen2", "qwen3") and canon.endswith(("wq.weight", "wk.weight")):
            t = half_to_interleaved(t, c.num_attention_heads if "wq" in canon else c.num_key_value_heads)
        add_gguf_tensor(w, gguf_tensor_name(canon), t.float().numpy(), gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _load(path: Path):
    ckpt = open_checkpoint(path)
    model = build_model(ckpt.config)
    load_weights(model, ckpt)
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_gguf_matches_hf_dir(family, tmp_path):
    hf = hf_family_model(family)
    hf.save_pretrained(tmp_path / "hf")
    from_gguf = _load(write_family_gguf(hf, family, tmp_path / "m.gguf"))
    from_dir = _load(tmp_path / "hf")
    ignore = {"name"}
    as_dict = lambda cfg: {k: v for k, v in cfg.to_dict().items() if k not in ignore}  # noqa: E731
    assert as_dict(from_gguf.config) == as_dict(from_dir.config)
    tokens = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(4))
    expected = hf(tokens).logits
    torch.testing.assert_close(from_dir(tokens), expected, **TOL)
    torch.testing.assert_close(from_gguf(tokens), expected, **TOL)


def write_mixtral_gguf(hf, path: Path, qtype=gguf.GGMLQuantizationType.F32) -> Path:
    """Mixtral as llama.cpp's converter writes it: arch `llama`, `llama.expert_count` /
    `expert_used_count`, the router `ffn_gate_inp` and the experts stacked per projection
    (`ffn_gate_exps` / `ffn_up_exps` `[E, F, dim]`, `ffn_down_exps` `[E, dim, F]`), from HF's own
    tensors (HF keeps gate and up stacked as `gate_up_proj` `[E, 2F, dim]`, gate rows first)."""
    c, F = hf.config, hf.config.intermediate_size
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf_writer(c, path, "llama", head_dim)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    for name, t in hf.state_dict().items():
        blk = f"blk.{name.split('.')[2]}." if ".layers." in name else ""
        if name.endswith("mlp.experts.gate_up_proj"):
            out = {f"{blk}ffn_gate_exps.weight": t[:, :F], f"{blk}ffn_up_exps.weight": t[:, F:]}
        elif name.endswith("mlp.experts.down_proj"):
            out = {f"{blk}ffn_down_exps.weight": t}
        elif name.endswith("mlp.gate.weight"):
            out = {f"{blk}ffn_gate_inp.weight": t}
        else:
            canon = hf_name_to_canonical(name)
            if canon.endswith(("wq.weight", "wk.weight")):
                t = half_to_interleaved(t, c.num_attention_heads if "wq" in canon else c.num_key_value_heads)
            out = {gguf_tensor_name(canon): t}
        for n, x in out.items():
            add_gguf_tensor(w, n, x.float().contiguous().numpy(), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype,tol", [("F32", 1e-5), ("Q8_0", 0.02)])
@torch.no_grad()
def test_mixtral_gguf_matches_hf(qtype, tol, tmp_path):
    """F32: HF's logits within 1e-5, and the HF directory's config. Q8_0 (every matrix, experts included,
    in llama.cpp's 8-bit blocks): within 0.02 of HF's fp32 logits (max |logit| 0.7; observed 7e-3)."""
    hf = hf_family_model("mixtral")
    model = _load(write_mixtral_gguf(hf, tmp_path / "m.gguf", getattr(gguf.GGMLQuantizationType, qtype)))
    cfg = model.config
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.ffn_dim) == (4, 2, hf.config.intermediate_size)
    if qtype == "F32":
        hf.save_pretrained(tmp_path / "hf")
        assert model.config.replace(name="x") == _load(tmp_path / "hf").config.replace(name="x")
    tokens = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=tol, atol=tol)
