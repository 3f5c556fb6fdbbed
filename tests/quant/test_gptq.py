"""GPTQ (fmstack.quant.gptq): lower output error than round to nearest, portable tensors consistent with
the installed Int4Linear modules, calibration windows from text / JSONL."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fmstack.errors import ParameterError
from fmstack.loading import load_model
from fmstack.quant import QuantSpec, quantizable_linears, quantize_model, spec_of
from fmstack.quant.gptq import calibration_ids, gptq_quantize, gptq_weight
from fmstack.quant.linear import Int4Linear, dequantize_int4, int4_params, quantize_int4_with
from fmstack.quant.ops import unpack_uint4

G = 32


def correlated_inputs(n: int, k: int, seed: int, mix_seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features of very different energies (as real activations have); the
    mixing matrix (the distribution) depends on `mix_seed` only, the samples on `seed`."""
    g = torch.Generator().manual_seed(mix_seed)
    mix = torch.randn(k, k, generator=g) * (0.1 + 2 * torch.rand(k, generator=g))[None]
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) @ mix / k ** 0.5


@pytest.mark.parametrize("act_order", [False, True])
def test_linear_error_below_rtn(act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = correlated_inputs(2048, 128, seed=1)
    x_test = correlated_inputs(1024, 128, seed=7)
    h = 2 / x.shape[0] * x.T @ x
    s, z = int4_params(w, G)
    w_rtn = dequantize_int4(quantize_int4_with(w, s, z, G), s, z, G)
    q, scales, zeros = gptq_weight(w, h, G, act_order=act_order)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    assert scales.shape == zeros.shape == (96, 128 // G)
    w_gptq = dequantize_int4(q, scales, zeros, G)
    for inp in (x, x_test):  # calibration and held-out inputs of the same distribution
        ref = inp @ w.T
        err_rtn = (ref - inp @ w_rtn.T).norm()
        err_gptq = (ref - inp @ w_gptq.T).norm()
        assert err_gptq < 0.85 * err_rtn, (err_gptq, err_rtn)


def test_linear_dead_columns_and_exact_grid():
    """Dead inputs (H_jj = 0) are rounded to nearest without NaNs; a weight already on the int4 grid is
    reproduced exactly (no error to propagate)."""
    g = torch.Generator().manual_seed(0)
    s0, z0 = torch.rand(8, 2, generator=g) + 0.1, torch.randn(8, 2, generator=g)
    q0 = torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8)
    q0[:, 0], q0[:, 1], q0[:, 32], q0[:, 33] = 0, 15, 0, 15  # each group spans the full grid
    w = dequantize_int4(q0, s0, z0, G)
    x = correlated_inputs(512, 64, seed=3)
    x[:, 5] = 0
    x[:, 40] = 0
    h = 2 / 512 * x.T @ x
    for act_order in (False, True):
        q, scales, zeros = gptq_weight(w, h, G, act_order=act_order)
        assert torch.equal(q, q0)
        torch.testing.assert_close(dequantize_int4(q, scales, zeros, G), w, rtol=0, atol=1e-5)
    w2 = torch.randn(8, 64, generator=g)
    q, scales, zeros = gptq_weight(w2, h, G)
    assert torch.isfinite(scales).all() and torch.isfinite(zeros).all()


def test_errors():
    with pytest.raises(ParameterError, match="group size"):
        gptq_weight(torch.randn(4, 48), torch.eye(48), 32)
    model = load_model("random:tiny-gqa").model
    with pytest.raises(ParameterError, match="mode 'gptq'"):
        gptq_quantize(model, torch.zeros(1, 4, dtype=torch.long), QuantSpec("int4"))


# --- tiny model -------------------------------------------------------------------------------------

VOCAB_USED = 48


def markov_tokens(n: int, T: int, seed: int) -> torch.Tensor:
    """Token sequences from a fixed random bigram chain over 48 of the 512 ids: structured inputs."""
    trans = torch.softmax(3 * torch.randn(VOCAB_USED, VOCAB_USED, generator=torch.Generator().manual_seed(0)), -1)
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB_USED, (n,), generator=g)
    for t in range(1, T):
        x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g)[:, 0]
    return (x * 7 + 3) % 512


@pytest.fixture(scope="module")
def tiny():
    model = load_model("random:tiny-gqa").model
    calib = markov_tokens(32, 48, seed=1)
    keep: dict = {}
    quantized = gptq_quantize(copy.deepcopy(model), calib, QuantSpec("gptq", G), keep=keep, micro_batch=8)
    return model, quantized, keep


@torch.no_grad()
def test_model_logits_closer_than_rtn(tiny):
    model, gptq, _ = tiny
    held_out = markov_tokens(8, 48, seed=2)
    ref = model(held_out)
    rtn = quantize_model(copy.deepcopy(model), QuantSpec("int4", G))
    err_rtn = (rtn(held_out) - ref).norm() / ref.norm()
    err_gptq = (gptq(held_out) - ref).norm() / ref.norm()
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    ao = gptq_quantize(copy.deepcopy(model), [t.tolist() for t in markov_tokens(32, 48, seed=1)],
                       QuantSpec("gptq", G), act_order=True)
    err_ao = (ao(held_out) - ref).norm() / ref.norm()
    assert err_ao < 0.9 * err_rtn, (err_ao, err_rtn)


@torch.no_grad()
def test_portable_tensors(tiny):
    model, gptq, keep = tiny
    assert spec_of(gptq) == QuantSpec("int4", G)  # gptq values in the int4 layout
    names = [n for n, _ in quantizable_linears(model)]
    assert sorted(keep) == sorted(f"{n}.{k}" for n in names for k in ("qweight", "scales", "zeros"))
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(4))
    for name, lin in quantizable_linears(model):
        n_out, k = lin.weight.shape
        qw, s, z = keep[f"{name}.qweight"], keep[f"{name}.scales"], keep[f"{name}.zeros"]
        assert qw.dtype == torch.uint8 and qw.shape == (n_out, k // 2) and qw.device.type == "cpu"
        assert s.dtype == z.dtype == torch.float32 and s.shape == z.shape == (n_out, k // G)
        mod = gptq.get_submodule(name)
        assert isinstance(mod, Int4Linear)
        w = dequantize_int4(unpack_uint4(qw), s, z, G)
        xk = x[:, :k].contiguous()
        torch.testing.assert_close(mod(xk), xk @ w.T, rtol=1e-4, atol=1e-5)
    # the stored tensors reproduce the model: rebuild from them and compare logits
    from fmstack.quant import load_quantized

    rebuilt = load_quantized(copy.deepcopy(model), QuantSpec("gptq", G),
                             lambda n: {k: keep[f"{n}.{k}"] for k in ("qweight", "scales", "zeros")})
    tokens = markov_tokens(2, 16, seed=5)
    torch.testing.assert_close(rebuilt(tokens), gptq(tokens), rtol=0, atol=0)


# --- calibration data --------------------------------------------------------------------------------

class ByteTokenizer:
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return list(text.encode("utf-8"))


def test_calibration_ids(tmp_path):
    tok = ByteTokenizer()
    txt = tmp_path / "a.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    ids = calibration_ids(tok, txt, n_samples=6, seq_len=16, seed=0)
    assert ids.shape == (6, 16) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_ids(tok, txt, n_samples=6, seq_len=16, seed=0))
    assert not torch.equal(ids, calibration_ids(tok, txt, n_samples=6, seq_len=16, seed=1))
    data = bytes(tok.encode(txt.read_text()))
    assert all(bytes(r.tolist()) in data for r in ids)

    jl = tmp_path / "rows.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"ctx": "alpha beta gamma"}, {"text": "delta epsilon",
                                                                                  "ctx": "unused"}]) + "\n")
    ids = calibration_ids(tok, jl, n_samples=3, seq_len=len("alpha beta gamma\n\ndelta epsilon"))
    assert bytes(ids[0].tolist()) == b"alpha beta gamma\n\ndelta epsilon"

    with pytest.raises(ParameterError, match="no such file"):
        calibration_ids(tok, tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ParameterError, match="no text"):
        calibration_ids(tok, empty)
    with pytest.raises(ParameterError, match="fewer than seq_len"):
        calibration_ids(tok, txt, seq_len=10_000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(ParameterError, match="'text' or 'ctx'"):
        calibration_ids(tok, bad)


@torch.no_grad()
def test_gptq_head(tiny):
    model, _, _ = tiny
    keep: dict = {}
    calib = markov_tokens(32, 48, seed=1)
    q = gptq_quantize(copy.deepcopy(model), calib, QuantSpec("gptq", G), keep=keep, head="gptq")
    assert keep["output.qweight"].shape == (model.output.weight.shape[0], model.output.weight.shape[1] // 2)
    held_out = markov_tokens(8, 48, seed=2)
    ref = model(held_out)
    rtn = quantize_model(copy.deepcopy(model), QuantSpec("int4", G))
    assert (q(held_out) - ref).norm() < 0.9 * (rtn(held_out) - ref).norm()
    with pytest.raises(ParameterError, match="head"):
        gptq_quantize(copy.deepcopy(model), calib, QuantSpec("gptq", G), head="int8")
