"""HF safetensors reader: logits match transformers for single-file and sharded checkpoints."""

import pytest
import torch

from fmstack.checkpoints import hf_name_to_canonical, open_checkpoint
from fmstack.config import RopeScaling

from .conftest import HF_CONFIGS, hf_logits, our_logits


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_round_trip(hf_models, tokens, tmp_path, name, shard):
    model = hf_models[name]
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **kw)
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).exists()
    torch.testing.assert_close(our_logits(tmp_path, tokens), hf_logits(model, tokens), rtol=1e-5, atol=1e-5)


def test_hf_config_and_metadata(hf_models, tmp_path):
    hf_models["gqa-untied"].save_pretrained(tmp_path, safe_serialization=True)
    ckpt = open_checkpoint(tmp_path)
    c = ckpt.config
    assert (ckpt.format, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == ("hf", 3, 8, 2, 192)
    assert not c.tie_embeddings
    assert c.rope_theta == 500000.0 and c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert ckpt.tokenizer_path == tmp_path and ckpt.metadata["config"]["model_type"] == "llama"


def test_hf_stream_only_requested(hf_models, tmp_path):
    hf_models["mha-tied"].save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    ckpt = open_checkpoint(tmp_path)
    got = dict(ckpt.tensors({"layers.1.attention.wk.weight", "norm.weight"}))
    assert set(got) == {"layers.1.attention.wk.weight", "norm.weight"}
    torch.testing.assert_close(got["norm.weight"], hf_models["mha-tied"].model.norm.weight.detach())


def test_hf_name_to_canonical(hf_models):
    mapping = {n: hf_name_to_canonical(n) for n in hf_models["gqa-untied"].state_dict()}
    assert None not in mapping.values() and len(set(mapping.values())) == len(mapping)
    assert mapping["model.layers.2.self_attn.q_proj.weight"] == "layers.2.attention.wq.weight"
    assert mapping["model.layers.0.mlp.gate_proj.weight"] == "layers.0.feed_forward.w1.weight"
    assert mapping["model.layers.0.mlp.up_proj.weight"] == "layers.0.feed_forward.w3.weight"
    assert mapping["model.layers.0.mlp.down_proj.weight"] == "layers.0.feed_forward.w2.weight"
    assert mapping["model.layers.1.post_attention_layernorm.weight"] == "layers.1.ffn_norm.weight"
    assert mapping["model.embed_tokens.weight"] == "tok_embeddings.weight"
    assert mapping["lm_head.weight"] == "output.weight" and mapping["model.norm.weight"] == "norm.weight"
    assert hf_name_to_canonical("model.layers.0.self_attn.rotary_emb.inv_freq") is None
