"""fmstack.backends.kernel_batch: an Inductor graph's C++ kernels built as a few libraries instead of
one each, results equal to eager, and the fallback to Inductor's own one-by-one build where a batched
library does not build. The compiled functions are tiny (a few pointwise/reduction kernels)."""

import importlib
import logging

import pytest
import torch

from fmstack.backends import kernel_batch

KERNEL = """#include "prefix.h"
#include <cmath>
extern "C"  void  kernel(const float* in_ptr0, float* out_ptr0, const int64_t ks0)
{
    for (int64_t i = 0; i < ks0; ++i) out_ptr0[i] = std::sin(in_ptr0[i]);
}
"""


def test_merged_source_namespaces_each_kernel_and_binds_each():
    two = [(["const float*", "float*", "const int64_t"], KERNEL)] * 2
    source = kernel_batch.merged_source(two)
    assert source.count('#include "prefix.h"') == 1 and source.count("#include <cmath>") == 1
    assert 'extern "C"' not in source.split("PyMODINIT_FUNC")[0].split("fmstack_bind")[0]
    for i in range(2):
        assert f"namespace k{i} {{" in source and f"k{i}::kernel(" in source and f'"kernel{i}", call{i}' in source
    assert source.count("PyInit_kernel") == 1
    assert "fmstack_bind::arity(args, 3, \"kernel0\")" in source


@pytest.mark.parametrize("argtypes, source, ok", [
    (["const float*", "float*", "const int64_t"], KERNEL, True),
    (["const float*", "float*", "const double", "bool"], KERNEL, True),
    (["const float*", "SomeStruct"], KERNEL, False),  # an argument type it does not convert
    (["const float*"], KERNEL + KERNEL, False),  # two entry points
    (["const float*"], KERNEL.replace('extern "C"', ""), False),  # no C entry point
])
def test_batchable(argtypes, source, ok):
    assert kernel_batch.batchable(argtypes, source) is ok


def test_chunks_keep_order_and_balance():
    assert kernel_batch._chunks([], [], 2) == []
    assert kernel_batch._chunks([7], [5], 2) == [[7]]
    assert kernel_batch._chunks([1, 2, 3, 4], [1, 1, 1, 1], 2) == [[1, 2], [3, 4]]
    assert kernel_batch._chunks([1, 2, 3], [10, 1, 1], 2) == [[1], [2, 3]]
    assert [i for run in kernel_batch._chunks(list(range(9)), [3] * 9, 4) for i in run] == list(range(9))


def _several_kernels(x: torch.Tensor, y: torch.Tensor) -> tuple:
    a = torch.sin(x) * 2 + y  # pointwise
    b = a.sum(0)  # a reduction the pointwise part cannot fuse into entirely
    c = torch.cumsum(b, 0)  # an extern op between them
    return a, torch.relu(c * b), (a @ y.t()).amax(1)


@pytest.fixture
def counting(monkeypatch):
    """Counts the batched libraries made (`merged_source` calls) and the kernels in them."""
    made: list[int] = []
    real = kernel_batch.merged_source

    def spy(kernels):
        made.append(len(kernels))
        return real(kernels)

    monkeypatch.setattr(kernel_batch, "merged_source", spy)
    torch._dynamo.reset()
    yield made
    torch._dynamo.reset()


def test_kernels_of_a_graph_build_together_and_equal_one_by_one(counting, tmp_path, monkeypatch):
    """Bit for bit the results of Inductor's own one-library-per-kernel build (and eager's, up to the
    summation order)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "batched"))  # built here, not found in a cache
    assert kernel_batch.install()
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    batched = torch.compile(_several_kernels, fullgraph=True)(x, y)
    assert counting and sum(counting) >= 2, "the graph's kernels went through a batched library"
    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "single"))
    monkeypatch.setenv(kernel_batch.ENV_SWITCH, "0")
    built = len(counting)
    single = torch.compile(_several_kernels, fullgraph=True)(x, y)
    assert len(counting) == built, "switched off: no batched library"
    for got, one_by_one, want in zip(batched, single, _several_kernels(x, y)):
        assert torch.equal(got, one_by_one)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_batch_that_does_not_build_falls_back_one_by_one(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_batch, "merged_source", lambda kernels: "#error this library does not build\n")
    gate = importlib.import_module("fmstack.backends.gate")
    monkeypatch.setattr(gate, "_warned", set())
    torch._dynamo.reset()
    assert kernel_batch.install()
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    with caplog.at_level(logging.WARNING, logger="fmstack.backends.gate"):
        out = torch.compile(_several_kernels, fullgraph=True)(x, y)
    torch._dynamo.reset()
    for got, want in zip(out, _several_kernels(x, y)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert "building them one by one" in caplog.text


def test_switch_off(monkeypatch):
    monkeypatch.setenv(kernel_batch.ENV_SWITCH, "0")
    assert not kernel_batch.enabled() and not kernel_batch.install()
