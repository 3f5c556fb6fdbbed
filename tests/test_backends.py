"""fmstack.backends: the version gate and its fallbacks (an unverified torch or a missing private
symbol -> the stock/public path, one warning, equal results), the CUDA decode settings built on CPU,
the quantized-kernel dispatch, compile logging, and the fence itself (no private torch outside)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

import fmstack
from fmstack.backends import (LoggedCompile, compile_counters, cpu_flash_attention, decode_compile_kwargs,
                              gate, has_kernel, kernels, mark_dynamic, recompile_limit, rowwise)
from fmstack.quant import ops
from fmstack.quant.linear import dequantize_int4, int4_params, quantize_int4_with, quantize_int8

GATE_LOG = "fmstack.backends.gate"


@pytest.fixture(autouse=True)
def fresh_gate():
    gate.reset()
    yield
    gate.reset()


def _gate_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == GATE_LOG and r.levelno == logging.WARNING]


def _hide(monkeypatch, name: str) -> None:
    def missing():
        raise AttributeError(f"hidden by the test: {name}")
    monkeypatch.setitem(gate.SYMBOLS, name, missing)


# -- the version gate --------------------------------------------------------------------------------

@pytest.mark.parametrize("version, ok", [("2.13.0+cpu", True), ("2.11.1", True), ("2.12.0", False),
                                         ("3.0.0a0+git", False)])
def test_verified_versions(monkeypatch, version, ok):
    monkeypatch.setattr(gate, "torch_version", lambda: version)
    assert gate.verified() is ok


def test_this_torch_is_verified_and_has_every_symbol(caplog):
    """The suite's own torch takes the private paths (else the rest of the suite tests the fallback)."""
    assert gate.verified(), torch.__version__
    missing = [name for name in gate.SYMBOLS if name != "aten._convert_weight_to_int4pack"
               and name != "aten._weight_int4pack_mm" and gate.symbol(name) is None]
    assert missing == []
    assert _gate_warnings(caplog) == []


def test_unverified_torch_uses_stock_compile_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(gate, "torch_version", lambda: "2.99.0")
    assert decode_compile_kwargs("cpu", frozen_attribute="model") == {"fullgraph": True, "dynamic": False}
    assert decode_compile_kwargs("cuda", frozen_attribute="model") == {"fullgraph": True, "dynamic": False,
                                                                       "mode": "reduce-overhead"}
    assert not has_kernel("_weight_int8pack_mm", "cpu")
    assert compile_counters() == {"graphs": 0, "frames": 0, "graph_breaks": 0, "cudagraph_skips": 0}
    x = torch.randn(3, 8)
    mark_dynamic(x, 0)  # a no-op on the stock path
    w = torch.randn(5, 8)
    torch.testing.assert_close(rowwise(lambda r: r @ w.T, x), x @ w.T)  # public ops only
    torch._dynamo.reset()
    step = torch.compile(lambda v: torch.nn.functional.silu(v) @ w.T, **decode_compile_kwargs("cpu"))
    torch.testing.assert_close(step(x), torch.nn.functional.silu(x) @ w.T, rtol=1e-5, atol=1e-5)
    warnings = _gate_warnings(caplog)
    assert len(warnings) == 1 and "2.99.0" in warnings[0] and "stock torch.compile" in warnings[0]


def test_missing_inductor_symbol_drops_the_cpu_backend(monkeypatch, caplog):
    _hide(monkeypatch, "inductor.compile_fx")
    for _ in range(2):
        kw = decode_compile_kwargs("cpu", frozen_attribute="model")
        assert kw == {"fullgraph": True, "dynamic": False}
    warnings = _gate_warnings(caplog)
    assert len(warnings) == 1 and "inductor.compile_fx" in warnings[0]


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_flash_attention_public_fallback_equals_the_kernel(monkeypatch, caplog, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7 if causal else 5, 16, generator=g) for _ in range(3))
    if causal:
        k, v = k[:, :, :7], v[:, :, :7]
    else:
        k, v = torch.randn(2, 3, 9, 16, generator=g), torch.randn(2, 3, 9, 16, generator=g)
    out, lse = cpu_flash_attention(q, k, v, causal)
    _hide(monkeypatch, "aten._scaled_dot_product_flash_attention_for_cpu")
    gate.reset()
    for _ in range(2):
        out2, lse2 = cpu_flash_attention(q, k, v, causal)
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse2, lse, rtol=1e-5, atol=1e-5)
    assert len(_gate_warnings(caplog)) == 1


def test_unknown_symbol_name_is_a_clear_error():
    with pytest.raises(KeyError, match="not a gated private torch symbol"):
        gate.symbol("aten._nope")


# -- compile settings --------------------------------------------------------------------------------

def test_cuda_decode_kwargs():
    """torch.compile rejects `mode` with `options`: CUDA graphs are an option, shapes static, and the
    model's guards are filtered as on CPU."""
    kw = decode_compile_kwargs("cuda", frozen_attribute="model")
    assert "mode" not in kw and kw["fullgraph"] is True and kw["dynamic"] is False
    opts = kw["options"]
    assert opts["triton.cudagraphs"] is True and opts["coordinate_descent_tuning"] is True

    class Entry:
        def __init__(self, name):
            self.name = name

    names = ["L['self'].model.layers[0].weight", "L['tokens']", "L['self'].cache", "self.model"]
    assert opts["guard_filter_fn"]([Entry(n) for n in names]) == [False, True, True, False]
    assert "guard_filter_fn" not in decode_compile_kwargs("cuda")["options"]
    torch.compile(lambda v: v, **kw)  # accepted (mode with options raises here, before any compile)


def test_recompile_limit_scope_nests_and_restores():
    cfg = torch._dynamo.config
    with cfg.patch(recompile_limit=8):
        with recompile_limit(64):
            with recompile_limit(32):
                assert cfg.recompile_limit == 64
            assert cfg.recompile_limit == 64
        assert cfg.recompile_limit == 8


def test_every_compile_is_logged_once_per_graph(caplog):
    caplog.set_level(logging.INFO, logger="fmstack.backends.compile")
    step = LoggedCompile(lambda t, *rest: t * 2, "decode step", backend="eager", fullgraph=True)
    z = torch.zeros(1)
    for batch, noise in ((1, None), (1, None), (2, None), (2, z)):
        step(torch.ones(batch, 1), z, z, z, z, z, noise)
    lines = [r.getMessage() for r in caplog.records if r.name == "fmstack.backends.compile"]
    assert len(lines) == 6, lines
    assert lines[0].startswith("compiling decode step (batch 1, greedy): once per process")
    assert re.match(r"compiled decode step \(batch 1, greedy\) in \d+\.\d s \(1 graph\(s\) built\)", lines[1])
    assert "batch 2, greedy" in lines[2] and "batch 2, sampled" in lines[4]


# -- quantized kernels -------------------------------------------------------------------------------

def test_has_kernel_reads_the_dispatch_key():
    assert has_kernel("_weight_int8pack_mm", "cpu")  # this CPU build registers it
    assert not has_kernel("_weight_int8pack_mm", "cuda")
    assert not has_kernel("_weight_int4pack_mm", "cpu")


def test_int8_dispatch(monkeypatch):
    """CPU: the reduction kernels; CUDA: F.linear * scales even where the native kernel exists; other
    accelerators: the native kernel only where one is registered for their dispatch key."""
    assert ops.int8_kernel(torch.device("cpu")) == "reduction"
    registered = set()
    monkeypatch.setattr(ops, "has_kernel", lambda op, device: (op, torch.device(device).type) in registered)
    assert ops.int8_kernel(torch.device("cuda")) == "linear"
    assert ops.int8_kernel(torch.device("mps")) == "linear"
    registered |= {("_weight_int8pack_mm", "cuda"), ("_weight_int8pack_mm", "mps")}
    assert ops.int8_kernel(torch.device("cuda")) == "linear"
    assert ops.int8_kernel(torch.device("mps")) == "native"


@pytest.mark.parametrize("kind", ["native", "linear"])
def test_int8_non_cpu_paths_match_reference(monkeypatch, kind):
    """The two non-CPU int8 paths, run on CPU tensors (this build has a CPU `_weight_int8pack_mm`)."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 64, generator=g), torch.randn(3, 2, 64, generator=g)[:, 1]  # a strided slice
    q, s = quantize_int8(w)
    monkeypatch.setattr(ops, "int8_kernel", lambda device: kind)
    torch.testing.assert_close(ops.int8_mm(x, q, s), x @ (q.float() * s[:, None]).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k, tiles", [(128, 8), (4096, 8), (64, 4), (192, 4), (96, 2), (32, 2), (48, None)])
def test_int4_inner_k_tiles(k, tiles):
    assert kernels.int4_inner_k_tiles(k) == tiles


def test_int4_layout_selection(monkeypatch):
    cuda = torch.device("cuda")
    assert ops.int4_layout(torch.device("cpu"), 96, 128, 32) == "planar"
    assert ops.has_native_int4(cuda) == has_kernel("_weight_int4pack_mm", cuda)  # False on a CPU build
    monkeypatch.setattr(ops, "has_native_int4", lambda device: False)
    assert ops.int4_layout(cuda, 96, 128, 32) == "unpacked"
    monkeypatch.setattr(ops, "has_native_int4", lambda device: device.type == "cuda")
    assert ops.int4_layout(cuda, 96, 128, 32) == "tinygemm"
    assert ops.int4_layout(cuda, 100, 128, 32) == "unpacked"  # N % 8 != 0
    assert ops.int4_layout(cuda, 96, 48, 16) == "unpacked"  # no tiling of K = 48
    assert ops.int4_layout(cuda, 96, 128, 16) == "unpacked"  # a group size tinygemm lacks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_unpacked_fallback_equals_dequantize_matmul(dtype):
    g = torch.Generator().manual_seed(2)
    n, k, group = 100, 128, 32  # N not a multiple of 8: tinygemm's fallback
    w, x = torch.randn(n, k, generator=g), torch.randn(3, k, generator=g).to(dtype)
    scales, zeros = int4_params(w, group)
    q = quantize_int4_with(w, scales, zeros, group)
    packed, sz = ops.int4_prepare(q, scales, zeros, dtype, layout="unpacked")
    assert packed.shape == (n, k) and sz.dtype == dtype and sz.shape == (k // group, n, 2)
    want = x.float() @ dequantize_int4(q, sz[..., 0].T.float(), sz[..., 1].T.float(), group).T
    got = ops.int4_mm(x, packed, sz, group)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * 10)
    with pytest.raises(ValueError, match="int4 layout 'tiled' is unknown"):
        ops.int4_prepare(q, scales, zeros, dtype, layout="tiled")


# -- the fence ---------------------------------------------------------------------------------------

# torch._x (not torch.__version__), aten._x also through an alias or getattr(aten, "_x"), the private packages
PRIVATE = re.compile(r"torch\._(?!_)|\baten\._|\baten\s*,\s*[\"']_|_inductor|_dynamo|_functorch")


def private_torch_uses(root: Path) -> list[str]:
    """`path:line: text` of each line under `root` (but outside `fmstack/backends/`) naming private torch."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if "backends" in path.relative_to(root).parts[:1]:
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                found.append(f"{path.relative_to(root.parent)}:{no}: {line.strip()}")
    return found


def test_scanner_finds_private_uses(tmp_path):
    pkg = tmp_path / "fmstack"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "a.py").write_text("import torch\nx = torch._dynamo.config\ny = 1\n")
    (pkg / "b.py").write_text("op = torch.ops.aten._weight_int8pack_mm\nv = torch.__version__\n"
                              "f = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu')\n")
    (pkg / "backends" / "c.py").write_text("from torch._inductor import config\n")
    assert private_torch_uses(pkg) == ["fmstack/a.py:2: x = torch._dynamo.config",
                                       "fmstack/b.py:1: op = torch.ops.aten._weight_int8pack_mm",
                                       "fmstack/b.py:3: f = getattr(torch.ops.aten, "
                                       "'_scaled_dot_product_flash_attention_for_cpu')"]


def test_no_private_torch_outside_backends():
    offenders = private_torch_uses(Path(fmstack.__file__).parent)
    assert offenders == [], "private torch outside fmstack/backends/:\n" + "\n".join(offenders)
