"""The native block kernels (`torch.ops.fmstack.block_linear`) against the pure-PyTorch reference
(`fmstack.quant.blocks.block_linear_reference`): every layout, decode and prefill row counts, both
activation modes, every instruction-set path this CPU has (and AVX2 chosen through
ATEN_CPU_CAPABILITY), inside torch.compile(fullgraph=True), and the fallbacks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmstack.backends import compile_counters
from fmstack import native
from fmstack.quant.blocks import (BlockLinear, BlockWeight, block_linear, block_linear_reference, pack_nibbles,
                                  pack_rows)

LAYOUTS = [(4, 32), (8, 32), (8, 16)]
ROWS = (1, 3, 17, 64)  # decode kernel (<= 16 rows, with a 4-row chunk and a remainder) and the BLAS path
N = 37  # odd: no output-row tiling works out evenly
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.available(), f"the native block kernels did not build: {native._state.get('error')}"
    yield
    native.isa(torch.backends.cpu.get_cpu_capability())  # undo any path a test chose


def make_weight(bits: int, block: int, dtype: torch.dtype, mins: bool, n: int = N, k: int = 160,
                seed: int = 0) -> BlockWeight:
    """Random quantized values over the whole range (int8 includes -128), scales and mins of both signs."""
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        qweight = pack_nibbles(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    else:
        qweight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.randn(n, k // block, generator=g) * 0.01).to(dtype)
    mn = (torch.randn(n, k // block, generator=g) * 0.01).to(dtype) if mins else None
    return BlockWeight(qweight, scales, mn, bits, block)


def assert_matches_reference(x: torch.Tensor, w: BlockWeight, int8_act: bool) -> None:
    ref = block_linear_reference(x, w, int8_act)
    p = pack_rows(w)
    out = native.block_linear(x, p.qweight, p.scales, p.mins, p.bits, p.block, p.n, int8_act)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # integer sums are exact; what is left is float32 rounding of ~K products
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("int8_act", [False, True])
@pytest.mark.parametrize("bits, block", LAYOUTS)
def test_every_layout_and_row_count(bits, block, int8_act):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.float32):
        for mins in (False, True):
            w = make_weight(bits, block, dtype, mins)
            for m in ROWS:
                assert_matches_reference(torch.randn(m, w.in_features, generator=g), w, int8_act)


def test_exact_mode_keeps_float32_precision_with_outliers():
    """The exact mode writes x as three int8 digits per block (error <= 6.1e-8 of the block's largest
    value): with activation outliers 1000x the rest in some blocks (as LLM activations have), its error
    against a float64 reference stays at the level of a float32 matmul of the dequantized weight."""
    g = torch.Generator().manual_seed(3)
    for path in {native.isa(name) for name in ("avx2", "avxvnni", "avx512vnni")}:
        native.isa(path)
        for bits, block in LAYOUTS:
            w = make_weight(bits, block, torch.float16, mins=bits == 4, k=576)
            x = torch.randn(2, w.in_features, generator=g)
            x[:, ::97] *= 1000.0
            wd = block_linear_reference(torch.eye(w.in_features), w).T  # the dequantized weight [N, K]
            exact = x.double() @ wd.double().T
            fp32_err = (x @ wd.T - exact).abs().max().item()
            p = pack_rows(w)
            out = native.block_linear(x, p.qweight, p.scales, p.mins, p.bits, p.block, p.n, False)
            assert (out.double() - exact).abs().max().item() <= 4 * fp32_err + 1e-9, (path, bits, block)
    native.isa(torch.backends.cpu.get_cpu_capability())


def test_every_instruction_set_path_of_this_cpu():
    paths = {native.isa(name) for name in ("scalar", "avx2", "avxvnni", "avx512vnni")}
    assert "scalar" in paths
    g = torch.Generator().manual_seed(2)
    for path in paths:
        assert native.isa(path) == path
        for bits, block in LAYOUTS:
            w = make_weight(bits, block, torch.float16, mins=bits == 4, k=224)  # odd block count for block 16
            for m in (1, 5):
                for int8_act in (False, True):
                    assert_matches_reference(torch.randn(m, w.in_features, generator=g), w, int8_act)


def test_aten_cpu_capability_avx2_selects_the_avx2_path():
    """A fresh process with ATEN_CPU_CAPABILITY=avx2 loads the cached library (no rebuild) and runs AVX2."""
    lib = next(native.build_dir().glob("*.so"))
    mtime = lib.stat().st_mtime_ns
    script = (
        "import json, torch\n"
        "from fmstack import native\n"
        "from fmstack.quant.blocks import BlockWeight, block_linear, block_linear_reference\n"
        "assert native.available()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "w = BlockWeight(torch.randint(-128, 128, (33, 96), generator=g, dtype=torch.int8),\n"
        "                torch.rand(33, 3, generator=g).half(), None, 8, 32)\n"
        "x = torch.randn(2, 96, generator=g)\n"
        "ref = block_linear_reference(x, w, True)\n"
        "err = ((block_linear(x, w, True) - ref).abs().max() / ref.abs().max()).item()\n"
        "print(json.dumps({'isa': native.isa(), 'aten': torch.backends.cpu.get_cpu_capability(), 'err': err}))\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["aten"] == "AVX2"
    assert got["isa"] == ("avx2" if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else "scalar")
    assert got["err"] < 1e-5
    assert lib.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("int8_act", [False, True])
def test_inside_fullgraph_compile_without_graph_breaks(int8_act):
    layer = BlockLinear(make_weight(4, 32, torch.float16, mins=True, k=128), int8_act=int8_act)
    x = torch.randn(2, 3, 128)
    eager = layer(x)
    before = compile_counters()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        out = compiled(x)
    after = compile_counters()
    assert after["graph_breaks"] == before["graph_breaks"]
    assert torch.equal(out, eager)  # the same native op ran (the reference rounds differently)
    assert not torch.equal(eager, block_linear_reference(x.reshape(6, 128), layer.weight_blocks, int8_act).reshape(2, 3, -1))


def test_disabled_by_environment_falls_back_to_the_reference(monkeypatch):
    w = make_weight(8, 32, torch.float32, mins=False)
    x = torch.randn(3, w.in_features)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.available()
    assert torch.equal(block_linear(x, w, True), block_linear_reference(x, w, True))
    monkeypatch.delenv(native.ENV_SWITCH)
    assert native.available()


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    w = make_weight(4, 32, torch.float16, mins=True)
    x = torch.randn(1, w.in_features)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        out = [block_linear(x, w, False) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if r.name == native.__name__]
    assert len(warnings) == 1 and "/nonexistent/c++" in warnings[0]
    assert torch.equal(out[0], block_linear_reference(x, w, False))


def test_gradients_take_the_reference():
    w = make_weight(8, 16, torch.float32, mins=True)
    x = torch.randn(2, w.in_features, requires_grad=True)
    block_linear(x, w, False).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(x=a["x"].double()), "x must be a contiguous float32"),
    (lambda a: a.update(scales=a["scales"][:, :2]), "scales must be contiguous float32 or float16 [G, K/block, 16]"),
    (lambda a: a.update(scales=a["scales"].bfloat16()), "float32 or float16"),
    (lambda a: a.update(mins=a["scales"].float()), "mins must match scales"),
    (lambda a: a.update(bits=4, block=16), "bits=4 block=16 is not supported"),
    (lambda a: a.update(qweight=a["qweight"][:, :64]), "qweight must be a contiguous interleaved"),
    (lambda a: a.update(n=a["n"] + 16), "qweight must be a contiguous interleaved"),
])
def test_bad_inputs_name_the_field(change, message):
    p = pack_rows(make_weight(8, 32, torch.float16, mins=False))
    args = {"x": torch.randn(2, p.in_features), "qweight": p.qweight, "scales": p.scales, "mins": None, "bits": 8,
            "block": 32, "n": p.n}
    change(args)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.fmstack.block_linear(args["x"], args["qweight"], args["scales"], args["mins"], args["bits"],
                                       args["block"], args["n"], False)


@pytest.mark.parametrize("bits, block", LAYOUTS)
def test_row_interleaving_round_trips(bits, block):
    """pack_rows then unpack gives the weight back bit for bit (all rows, or a lookup's rows), with the
    16-row groups padded to whole groups (N = 37: 3 groups)."""
    w = make_weight(bits, block, torch.float16, mins=True)
    p = pack_rows(w)
    assert p.qweight.shape[0] == p.scales.shape[0] == 3 and p.n == N
    back = p.unpack()
    assert all(torch.equal(a, b) for a, b in [(back.qweight, w.qweight), (back.scales, w.scales), (back.mins, w.mins)])
    rows = torch.tensor([36, 0, 17, 17])
    some = p.unpack(rows)
    assert torch.equal(some.qweight, w.qweight[rows]) and torch.equal(some.mins, w.mins[rows])


def test_unknown_isa_request_is_an_error():
    with pytest.raises(RuntimeError, match="unknown request 'sse9'"):
        native.isa("sse9")


@pytest.mark.slow
def test_concurrent_first_builds_share_one_cache(tmp_path):
    """Two processes building into one empty cache: both load a working op, one library results."""
    script = ("import torch\nfrom fmstack import native\nassert native.available(), native._state\n"
              "print(native.isa())\n")
    env = dict(os.environ, FMSTACK_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    assert len(list((tmp_path / "kernels").glob("*/*.so"))) == 1


def _ggml_blocks(raw: torch.Tensor, fmt: str) -> BlockWeight:
    """A GGUF Q4_1 / Q8_0 tensor's bytes `[N, blocks * bytes per block]` split into the block layout by
    hand (ggml's block structs: fp16 d, [fp16 m,] quants), to check the kernels read GGUF as it is."""
    n = raw.shape[0]
    b = raw.reshape(n, -1, 20 if fmt == "Q4_1" else 34)
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]
    if fmt == "Q4_1":
        m = b[..., 2:4].contiguous().view(torch.float16)[..., 0]
        return BlockWeight(b[..., 4:].reshape(n, -1).contiguous(), d.contiguous(), m.contiguous(), 4, 32)
    return BlockWeight(b[..., 2:].reshape(n, -1).contiguous().view(torch.int8), d.contiguous(), None, 8, 32)


@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "token_embd.weight"])
def test_real_gguf_blocks_match_ggml_dequantization(smollm2_gguf, name):
    """SmolLM2's own Q4_1 projection and Q8_0 embedding/head: the kernels against gguf-py's dequantizer."""
    import gguf

    t = next(t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors if t.name == name)
    raw = torch.from_numpy(t.data.copy())[:256]  # 256 output rows keep it fast
    w = _ggml_blocks(raw, t.tensor_type.name)
    dense = torch.from_numpy(gguf.quants.dequantize(t.data[:256], t.tensor_type)).float()
    x = torch.randn(3, w.in_features, generator=torch.Generator().manual_seed(3))
    float_act = block_linear(x, w, False)
    torch.testing.assert_close(float_act, x @ dense.T, rtol=1e-5, atol=1e-5 * float_act.abs().max().item())
    assert_matches_reference(x, w, True)


@pytest.mark.parametrize("bits, block", LAYOUTS)
def test_block_rows_is_the_dequantized_lookup(bits, block):
    """torch.ops.fmstack.block_rows (a quantized embedding's lookup) = the rows of the dequantized
    weight, repeated and out-of-order ids included; an id out of range is an error naming it."""
    from fmstack.quant.blocks import dequantize_blocks

    w = make_weight(bits, block, torch.float16, mins=True)
    p = pack_rows(w)
    ids = torch.tensor([[36, 0], [17, 17]])
    rows = native.block_rows(p.qweight, p.scales, p.mins, p.bits, p.block, p.n, ids)
    torch.testing.assert_close(rows, dequantize_blocks(w)[ids.reshape(-1)], rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"id 37 at position 1 is out of range \[0, 37\)"):
        native.block_rows(p.qweight, p.scales, p.mins, p.bits, p.block, p.n, torch.tensor([0, 37]))
