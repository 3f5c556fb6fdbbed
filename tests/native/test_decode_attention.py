"""`torch.ops.fmstack.decode_attention` (fmstack/native) against SDPA with the same mask: every
instruction-set path of this CPU, grouped-query heads, several query tokens, left padding, head sizes
with and without a vector variant, and its use by the static KV cache inside a compiled step."""

from __future__ import annotations

import pytest
import torch

from fmstack import native
from fmstack.backends import compile_counters
from fmstack.generation.kv_cache import attend_visible
from fmstack.models.llama import sdpa

SHAPES = [  # B, H, Hkv, T, S, D
    (1, 9, 3, 1, 256, 64),   # SmolLM2's decode step
    (2, 4, 2, 3, 50, 40),    # D 40: no vector variant (scalar loop)
    (1, 8, 8, 2, 64, 128),
    (3, 6, 2, 1, 33, 16),
    (2, 4, 1, 5, 17, 32),
]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.available(), f"the native kernels did not build: {native._state.get('error')}"
    yield
    native.isa(torch.backends.cpu.get_cpu_capability())


def inputs(B, H, Hkv, T, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    last = torch.randint(T - 1, S, (B,), generator=g)  # each row's last query slot
    q_slots = last[:, None] - (T - 1) + torch.arange(T)  # [B, T]
    pad = torch.randint(0, S // 3 + 1, (B,), generator=g).minimum(q_slots[:, 0])
    slots = torch.arange(S)
    visible = (slots <= q_slots[:, None, :, None]) & (slots >= pad[:, None, None, None])
    return q, k, v, visible


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_sdpa_on_every_path(shape):
    q, k, v, visible = inputs(*shape)
    ref = sdpa(q, k, v, mask=visible)
    for isa in dict.fromkeys(native.isa(i) for i in ("avx512vnni", "avxvnni", "avx2", "scalar")):
        native.isa(isa)
        out = native.decode_attention(q, k, v, visible, q.shape[-1] ** -0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"path {isa}")


def test_keys_outside_the_mask_are_never_read():
    """NaN in every invisible slot (as in a cache's unwritten slots) must not reach the output."""
    q, k, v, visible = inputs(2, 4, 2, 1, 40, 64)
    k, v = k.masked_fill(~visible[:, :, -1, :, None], float("nan")), v.masked_fill(~visible[:, :, -1, :, None], float("nan"))
    out = native.decode_attention(q, k, v, visible, 0.125)
    assert torch.isfinite(out).all()
    kk, vv = k.nan_to_num(0.0), v.nan_to_num(0.0)
    torch.testing.assert_close(out, sdpa(q, kk, vv, mask=visible), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_field():
    q, k, v, visible = inputs(1, 4, 2, 1, 8, 16)
    with pytest.raises(RuntimeError, match="visible must be a contiguous bool"):
        torch.ops.fmstack.decode_attention(q, k, v, visible.float(), 0.25)
    k3 = torch.randn(1, 3, 8, 16)
    with pytest.raises(RuntimeError, match="H a multiple of Hkv"):
        torch.ops.fmstack.decode_attention(q, k3, k3, visible, 0.25)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.fmstack.decode_attention(q.double(), k, v, visible, 0.25)


def test_attend_visible_uses_the_kernel_for_a_few_tokens_only(monkeypatch):
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    q, k, v, visible = inputs(1, 9, 3, 1, 64, 64)
    torch.testing.assert_close(attend_visible(q, k, v, visible), sdpa(q, k, v, mask=visible), rtol=1e-5, atol=1e-5)
    q_long, k2, v2, vis2 = inputs(1, 4, 2, 20, 64, 32)  # a prefill-sized query: SDPA
    torch.testing.assert_close(attend_visible(q_long, k2, v2, vis2), sdpa(q_long, k2, v2, mask=vis2))
    assert calls == [1]


def test_compiles_without_graph_breaks():
    q, k, v, visible = inputs(1, 9, 3, 2, 64, 64, seed=4)
    before = compile_counters()
    step = torch.compile(attend_visible, fullgraph=True, dynamic=False)
    torch.testing.assert_close(step(q, k, v, visible), sdpa(q, k, v, mask=visible), rtol=1e-5, atol=1e-5)
    after = compile_counters()
    assert after["graph_breaks"] == before["graph_breaks"] and after["graphs"] == before["graphs"] + 1
