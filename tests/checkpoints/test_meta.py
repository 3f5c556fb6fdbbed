"""Meta reader: params.json + consolidated.NN.pth (1 or 2 model-parallel shards) match HF logits."""

import json

import pytest
import torch

from fmstack.checkpoints import open_checkpoint
from fmstack.checkpoints.meta import half_to_interleaved, interleaved_to_half
from fmstack.config import RopeScaling

from .conftest import hf_logits, our_logits, write_meta


def test_permutation_inverse():
    w = torch.randn(4 * 16, 64)
    torch.testing.assert_close(interleaved_to_half(half_to_interleaved(w, 4), 4), w, rtol=0, atol=0)
    # head 0 of an interleaved weight holds rows (x0, y0, x1, y1, ...); rotate-half puts x's first
    w = torch.arange(8.0)[:, None].expand(8, 2)
    assert interleaved_to_half(w, 1)[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("name", ["mha-untied", "gqa-untied", "mha-tied"])
@pytest.mark.parametrize("shards,emb_dim", [(1, 1), (2, 1), (2, 0)])
def test_meta_round_trip(hf_models, tokens, tmp_path, name, shards, emb_dim):
    model = hf_models[name]
    write_meta(model, tmp_path, shards=shards, emb_split_dim=emb_dim)
    torch.testing.assert_close(our_logits(tmp_path, tokens), hf_logits(model, tokens), rtol=1e-5, atol=1e-5)


def test_meta_config_and_tokenizer(hf_models, tmp_path):
    ckpt_dir = write_meta(hf_models["gqa-untied"], tmp_path / "8B", shards=2, emb_split_dim=1)
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    ckpt = open_checkpoint(ckpt_dir)
    c = ckpt.config
    assert (ckpt.format, c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == \
        ("meta", 512, 64, 3, 8, 2, 192)
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and not c.tie_embeddings
    assert ckpt.tokenizer_path == tmp_path / "tokenizer.model"
    assert ckpt.metadata["params"] == json.loads((ckpt_dir / "params.json").read_text())


def test_meta_stream_only_requested(hf_models, tmp_path):
    write_meta(hf_models["mha-untied"], tmp_path, shards=2)
    got = dict(open_checkpoint(tmp_path).tensors({"layers.0.attention.wo.weight"}))
    assert list(got) == ["layers.0.attention.wo.weight"] and got["layers.0.attention.wo.weight"].shape == (64, 64)
