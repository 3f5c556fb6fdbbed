"""fmstack's Transformer vs HF transformers' LlamaForCausalLM on identical random weights (fp32).

Tolerance: rtol 1e-5 / atol 1e-5 on logits (observed max abs error ~1e-6 for these tiny models).
"""

import pytest
import torch

from fmstack.config import ModelConfig, RopeScaling, from_hf_config, named_config
from fmstack.errors import ConfigError
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.models.llama import Transformer, rope_inv_freq
from tests.conftest import hf_and_ours, hf_llama_config, prefill_then_decode

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["llama2", "llama3"])
@torch.no_grad()
def test_prefill_logits_match_hf(style):
    hf, ours = hf_and_ours(style)
    tokens = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    expected = hf(tokens).logits
    torch.testing.assert_close(ours(tokens), expected, **TOL)


@pytest.mark.parametrize("style", ["llama2", "llama3"])
@torch.no_grad()
def test_cached_decode_matches_hf(style):
    """Prefill 11 tokens, then decode 9 one at a time through the static cache."""
    hf, ours = hf_and_ours(style)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(prefill_then_decode(ours, tokens, 11), hf(tokens).logits, **TOL)


@torch.no_grad()
def test_left_padded_batch_equals_single_rows():
    """Row b left-padded by pad[b] slots gives the same logits as that row alone."""
    _, ours = hf_and_ours("llama3")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 512, (1, 12), generator=g), torch.randint(0, 512, (1, 7), generator=g)
    cache = StaticKVCache(ours.config, batch_size=2, max_seq_len=32)
    pad = torch.tensor([0, 5])
    tokens = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    positions = torch.arange(12)[None] - pad[:, None]
    cache.reset(pad)
    batched = ours(tokens, positions, cache)
    torch.testing.assert_close(batched[0], ours(a)[0], **TOL)
    torch.testing.assert_close(batched[1, 5:], ours(b)[0], **TOL)
    nxt = torch.tensor([[3], [4]])
    step = ours(nxt, torch.tensor([[12], [7]]), cache)
    torch.testing.assert_close(step[1, 0], ours(torch.cat([b, nxt[1:]], 1))[0, -1], **TOL)


def test_rope_scaling_frequencies_match_hf():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = hf_llama_config("llama3")
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(from_hf_config(hf_cfg.to_dict())), expected)


def test_named_configs_parameter_counts():
    """Known sizes: llama2-7b 6.74B, llama3-8b 8.03B, smollm2-135m 134.5M parameters."""
    def count(name):
        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(named_config(name)).parameters())

    assert abs(count("llama2-7b") - 6.738e9) / 6.738e9 < 1e-3
    assert abs(count("llama3-8b") - 8.030e9) / 8.030e9 < 1e-3
    assert abs(count("smollm2-135m") - 134.5e6) / 134.5e6 < 2e-3


def test_tied_embeddings_share_storage():
    with torch.device("meta"):
        m = Transformer(named_config("tiny-mha"))
    assert m.output.weight is m.embed.weight
    with torch.device("meta"):
        m = Transformer(named_config("tiny-gqa"))
    assert m.output.weight is not m.embed.weight


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        named_config("nope")
    with pytest.raises(ConfigError, match="unknown architecture"):
        from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert ModelConfig.from_dict(named_config("tiny-gqa").to_dict()) == named_config("tiny-gqa")
    assert isinstance(named_config("llama3.1-8b").rope_scaling, RopeScaling)
