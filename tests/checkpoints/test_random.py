"""`random:<config>` as a checkpoint reader: named configs, per-tensor seeds, the same loading path."""

import pytest
import torch

from fmstack.checkpoints import expected_shapes, is_generated, load_weights, open_checkpoint
from fmstack.checkpoints.random_weights import random_checkpoint
from fmstack.config import named_config
from fmstack.errors import ConfigError
from fmstack.loading import load_model
from fmstack.models.build import build_model


def test_opens_named_config_with_every_canonical_tensor():
    ckpt = open_checkpoint("random:tiny-gqa")
    assert ckpt.format == "random" and ckpt.config == named_config("tiny-gqa") and ckpt.tokenizer_path is None
    assert ckpt.quant is None and str(ckpt.path) == "random:tiny-gqa"
    tensors = dict(ckpt.tensors(None))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_shapes(ckpt.config)
    assert torch.equal(tensors["norm.weight"], torch.ones(64))
    std = tensors["layers.0.attention.wq.weight"].std().item()
    assert 0.018 < std < 0.022, std


def test_seeded_per_tensor():
    a = dict(open_checkpoint("random:tiny-gqa", seed=3).tensors(None))
    b = dict(open_checkpoint("random:tiny-gqa", seed=3).tensors(None))
    c = dict(open_checkpoint("random:tiny-gqa", seed=4).tensors(None))
    name = "layers.1.feed_forward.w2.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    # a rank reading only some tensors draws exactly the same values for them
    part = dict(random_checkpoint(named_config("tiny-gqa"), seed=3).tensors({name}))
    assert list(part) == [name] and torch.equal(part[name], a[name])


def test_unknown_config_and_generated_names():
    with pytest.raises(ConfigError, match="unknown config 'nope'; known: .*tiny-gqa"):
        open_checkpoint("random:nope")
    assert is_generated("random:tiny-mha") and not is_generated("/tmp/model.gguf")


def test_load_model_random_is_the_reader_streamed_into_a_built_model():
    loaded = load_model("random:tiny-mha", seed=2)
    assert (loaded.source, loaded.format, loaded.tokenizer) == ("random:tiny-mha", "random", None)
    ref = build_model(named_config("tiny-mha"))
    load_weights(ref, open_checkpoint("random:tiny-mha", seed=2))
    for (name, p), q in zip(loaded.model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert loaded.model.output.weight is loaded.model.embed.weight  # tied
