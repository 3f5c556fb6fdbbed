"""`sdpa` folds masked grouped-query attention into the query length; it must give the same numbers
as the math backend on K/V repeated per query head, compile without graph breaks, and the
backend report and the `--sdpa-backend flash` refusal must say what they should."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.generation.generate import sdpa_backends
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.models.llama import Transformer, fold_gqa, sdpa, sdpa_backend_name, unfold_gqa

TOL = dict(rtol=1e-5, atol=1e-5)


def qkv_mask(B: int, H: int, Hkv: int, T: int, S: int, mask_heads: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, 16, generator=g)
    k, v = torch.randn(2, B, Hkv, S, 16, generator=g)
    mask = torch.rand(B, mask_heads, T, S, generator=g) > 0.4
    mask[..., 0] = True  # no fully masked row (SDPA gives NaN there on every backend)
    return q, k, v, mask


def math_reference(q, k, v, mask):
    G = q.shape[1] // k.shape[1]
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)


@pytest.mark.parametrize("B, T, S", [(1, 1, 7), (3, 1, 20), (2, 5, 20), (2, 20, 20)])
@pytest.mark.parametrize("H, Hkv", [(8, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("mask_heads", [1, "H"])
def test_folded_gqa_matches_math_backend(B, T, S, H, Hkv, mask_heads):
    q, k, v, mask = qkv_mask(B, H, Hkv, T, S, H if mask_heads == "H" else 1)
    got = sdpa(q, k, v, mask)
    assert got.shape == q.shape
    torch.testing.assert_close(got, math_reference(q, k, v, mask), **TOL)


def test_folded_gqa_broadcast_masks():
    """A mask broadcast over the batch (`[1, 1, T, S]`) or given as `[T, S]` folds the same way."""
    q, k, v, mask = qkv_mask(3, 8, 2, 4, 9)
    for m in (mask[:1], mask[0, 0]):
        torch.testing.assert_close(sdpa(q, k, v, m), math_reference(q, k, v, m), **TOL)


def test_fold_unfold_round_trip():
    q = torch.randn(2, 6, 5, 4)
    folded = fold_gqa(q, 2)
    assert folded.shape == (2, 2, 15, 4)
    torch.testing.assert_close(folded[1, 1, 5:10], q[1, 4])  # kv head 1, group 1 -> query head 1*3 + 1
    torch.testing.assert_close(unfold_gqa(folded, 6), q)


def test_unmasked_gqa_is_unchanged():
    q, k, v, _ = qkv_mask(2, 8, 2, 6, 6)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True), ref, **TOL)


@torch.no_grad()
def test_cached_gqa_decode_compiles_without_graph_breaks():
    """The static-cache decode step with the folded masked GQA traces as one graph (fullgraph=True
    raises on a break) and gives the eager numbers."""
    cfg = ModelConfig(name="t", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=64)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    caches = [StaticKVCache(cfg, 2, 16) for _ in range(2)]
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(5).expand(2, -1)
    for c in caches:
        model(prompt, pos, c)

    def step(tokens, positions, cache):
        return model(tokens, positions, cache)

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="eager")
    tok = torch.tensor([[3], [7]])
    for i in range(5, 8):
        p = torch.full((2, 1), i)
        torch.testing.assert_close(compiled(tok, p, caches[0]), step(tok, p, caches[1]), **TOL)


def test_backend_name_on_cpu():
    q, k, v, mask = qkv_mask(2, 8, 2, 1, 20)
    assert sdpa_backend_name(q, k, v, mask) == "flash (cpu)"
    with sdpa_kernel([SDPBackend.MATH]):
        assert sdpa_backend_name(q, k, v, mask) == "math"


def test_flash_with_masked_cache_is_refused_on_cuda():
    with pytest.raises(ParameterError, match="--sdpa-backend flash.*mask"):
        sdpa_backends("flash", torch.device("cuda"), masked=True)
    assert sdpa_backends("flash", torch.device("cuda")) == [SDPBackend.FLASH_ATTENTION]  # unmasked callers
    assert sdpa_backends("flash", torch.device("cpu"), masked=True) == [SDPBackend.FLASH_ATTENTION]  # CPU flash masks


def test_folded_masked_gqa_copies_no_kv_under_the_math_backend():
    """The point of folding: even the math backend runs on the kv heads as they are, where a masked
    `enable_gqa` call expands K/V per query head (`repeat_interleave`) at every call."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, mask = qkv_mask(2, 8, 2, 1, 64)

    def ops(fn) -> set[str]:
        with sdpa_kernel([SDPBackend.MATH]), profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.key for e in prof.key_averages()}

    assert "aten::repeat_interleave" in ops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                   enable_gqa=True))
    assert "aten::repeat_interleave" not in ops(lambda: sdpa(q, k, v, mask))
