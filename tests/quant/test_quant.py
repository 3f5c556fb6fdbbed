"""Weight-only quantization: error bounds, packing, kernels vs a dequantized reference (this torch
version's native op and the fallback), quantized tiny models, save/load, clear errors."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fmstack.errors import ParameterError
from fmstack.loading import load_model
from fmstack.quant import QuantSpec, quantize_model, rtn_portable, spec_of
from fmstack.quant import ops
from fmstack.quant.linear import Int4Linear, Int8Linear, dequantize_int4, int4_params, quantize_int4_with, quantize_int8

g = torch.Generator().manual_seed(0)
W = torch.randn(96, 128, generator=g)
X = torch.randn(5, 128, generator=g)


def test_int8_error_bound():
    q, s = quantize_int8(W)
    assert q.dtype == torch.int8 and s.shape == (96,)
    assert ((q.float() * s[:, None] - W).abs() <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_bound(group):
    scales, zeros = int4_params(W, group)
    q = quantize_int4_with(W, scales, zeros, group)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize_int4(q, scales, zeros, group) - W).abs().reshape(96, -1, group)
    assert (err <= scales[..., None] / 2 + 1e-5).all()


def test_pack_unpack_roundtrip():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = ops.pack_uint4(q)
    assert packed.shape == (8, 32) and torch.equal(ops.unpack_uint4(packed), q)


def _int8_cases():
    q, s = quantize_int8(W)
    return Int8Linear.from_portable(q, s, torch.float32), q.float() * s[:, None]


def _int4_case(group):
    t = rtn_portable(W, QuantSpec("int4", group))
    lin = Int4Linear.from_portable(t["qweight"], t["scales"], t["zeros"], group, torch.float32)
    return lin, dequantize_int4(ops.unpack_uint4(t["qweight"]), t["scales"], t["zeros"], group)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("kind", ["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_kernels_match_dequantized_reference(kind, rows):
    """Eager: one row (native int8 op / planar dequantize) and several rows (dequantize + BLAS)."""
    lin, deq = _int8_cases() if kind == "int8" else _int4_case(int(kind.split("-g")[1]))
    x = X[:rows]
    torch.testing.assert_close(lin(x), x @ deq.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kind", ["int8", "int4-g32", "int4-g128"])
def test_compiled_few_row_reduction_matches_reference(kind, rows):
    """Under torch.compile a matmul of few rows is the fused reduction over the quantized bytes (one
    accumulator per row), here fed by a SwiGLU-like producer that is stored before it."""
    torch._dynamo.reset()
    lin, deq = _int8_cases() if kind == "int8" else _int4_case(int(kind.split("-g")[1]))
    x = X[:rows]
    got = torch.compile(lambda v: lin(F.silu(v) * v), fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(got, (F.silu(x) * x) @ deq.T, rtol=1e-4, atol=1e-4)


def test_group_planar_layout():
    """Byte j of group g holds q[g*G + j] (high nibble) and q[g*G + G/2 + j] (low nibble)."""
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8, generator=g)
    p = ops.pack_group_planar(q, 32)
    assert p.shape == (3, 2, 16) and torch.equal(ops.unpack_group_planar(p), q)
    assert int(p[1, 1, 5]) == (int(q[1, 32 + 5]) << 4) | int(q[1, 32 + 16 + 5])
    lin, _ = _int4_case(32)
    assert lin.weight.dtype == torch.uint8 and lin.weight.shape == (96, 4, 16)  # the CPU layout


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-gqa", seed=0).model


@pytest.mark.parametrize("spec, tol", [(QuantSpec("int8"), 0.02), (QuantSpec("int4", 32), 0.15)])
def test_quantized_tiny_model_close_to_float(tiny, spec, tol):
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny(tokens)
        q = quantize_model(copy.deepcopy(tiny), spec)
        out = q(tokens)
    assert isinstance(q.layers[0].attn.wqkv, Int8Linear if spec.bits == 8 else Int4Linear)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < tol, rel


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_and_load_quantized_checkpoint(tiny, tmp_path, mode):
    from fmstack.checkpoints.native import save_checkpoint

    spec, keep = QuantSpec(mode, 32), {}
    q = quantize_model(copy.deepcopy(tiny), spec, keep=keep)
    save_checkpoint(tmp_path, q, quantized=keep, source="random:tiny-gqa")
    loaded = load_model(str(tmp_path))
    assert loaded.format == "fmstack" and spec_of(loaded.model) == spec
    assert not any(p.is_meta for p in loaded.model.parameters())
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), q(tokens))


def test_saved_scheme_is_the_given_one_and_loading_does_not_quantize(tiny, tmp_path, caplog):
    import json
    import logging

    from fmstack.checkpoints import open_checkpoint
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.errors import CheckpointError

    keep = {}
    q = quantize_model(copy.deepcopy(tiny), QuantSpec("int4", 32), keep=keep)
    assert spec_of(q) == QuantSpec("int4", 32) and spec_of(tiny) is None
    with pytest.raises(CheckpointError, match="spec int8 does not match the model's projections"):
        save_checkpoint(tmp_path / "bad", q, quantized=keep, spec=QuantSpec("int8"))
    save_checkpoint(tmp_path, q, quantized=keep, spec=QuantSpec("gptq", 32))  # as `fmstack quantize --mode gptq`
    assert json.loads((tmp_path / "config.json").read_text())["quantization"]["mode"] == "gptq"
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.quant == QuantSpec("gptq", 32) and set(ckpt.quant_tensors("output")) == {"qweight", "scales", "zeros"}
    with caplog.at_level(logging.DEBUG, logger="fmstack"):
        loaded = load_model(str(tmp_path))
    assert spec_of(loaded.model) == QuantSpec("int4", 32)
    assert not any("quantiz" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert any("reading gptq weights" in r.getMessage() for r in caplog.records)


def test_float_fmstack_checkpoint_roundtrip(tiny, tmp_path):
    from fmstack.checkpoints.native import save_checkpoint

    save_checkpoint(tmp_path, tiny)
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path)).model(tokens), tiny(tokens))


def test_unsupported_group_size():
    with pytest.raises(ParameterError, match="--group-size 48 is not supported"):
        QuantSpec("int4", 48)


def test_group_size_must_divide_width(tiny):
    with pytest.raises(ParameterError, match="does not divide the input width 64 of layers.0.attn.wqkv"):
        quantize_model(copy.deepcopy(tiny), QuantSpec("int4", 128))


def test_quantize_errors_at_load(tmp_path):
    with pytest.raises(ParameterError, match="calibration"):
        load_model("random:tiny-gqa", quantize="gptq")
    with pytest.raises(ParameterError, match="mode 'int3'"):
        load_model("random:tiny-gqa", quantize="int3")


def test_cli_quantize_then_load(tmp_path):
    out = tmp_path / "q8"
    proc = subprocess.run([sys.executable, "-m", "fmstack", "quantize", "--model", "random:tiny-mha", "--mode", "int8",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert spec_of(load_model(str(out)).model) == QuantSpec("int8")
    proc = subprocess.run([sys.executable, "-m", "fmstack", "quantize", "--model", "random:tiny-mha", "--mode", "int4",
                           "--group-size", "128", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "does not divide" in proc.stderr and "Traceback" not in proc.stderr
