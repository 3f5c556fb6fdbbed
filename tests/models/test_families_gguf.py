"""GGUF files of the other families, written as llama.cpp's converter writes them (arch `qwen2`,
`qwen3`, `granite`; Mistral as arch `llama` with its window in `llama.attention.sliding_window`),
load to the same config and logits as the HF directory of the same random model (fp32, rtol/atol 1e-5)."""

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
