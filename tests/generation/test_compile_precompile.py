"""Whole compiled steps (`fmstack.backends.precompile`, stored by `generation.compile_cache`): a later
process loads a generator's step without Dynamo tracing it, the entry serves a model with other weights
(weights are graph inputs, not constants), compiled == eager, a changed argument shape or compile
setting is another key, a corrupt, truncated or stale entry is rebuilt (one warning for an unusable
one). Tiny model: one cold compile of the decode step and the few-token forward for the module."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmstack.backends import compile_counters, mark_dynamic
from fmstack.backends.inductor import decode_compile_kwargs
from fmstack.backends.precompile import (compile_settings, global_state, owner_state, precompile_available,
                                         variant)
from fmstack.generation.compile_cache import cache_entries
from fmstack.generation.generate import Generator
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model

pytestmark = pytest.mark.skipif(not precompile_available(), reason="this torch cannot save whole compiled steps")

PROMPT, PARAMS = [[7]], SamplingParams(max_new_tokens=4)  # a one-token prompt: the decode step alone

WARM = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from torch._dynamo.utils import compile_times
from fmstack.backends import cache_counters, compile_counters
from fmstack.generation.generate import Generator
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model
gen = Generator(load_model("random:tiny-gqa", seed=0).model, eos_ids=[], compile=True, max_seq_len=64)
out = gen.generate([[7]], SamplingParams(max_new_tokens=4))
times = compile_times(repr="csv", aggregate=True)
print(json.dumps({"ids": out[0].token_ids, "phases": times[0] if times else [], **compile_counters(),
                  **cache_counters()}))
"""


def entries(root: Path) -> dict[str, dict]:
    """The whole-step entries under `root`: path -> key."""
    return {e["path"]: e["key"] for e in cache_entries(root / "compile") if e["key"]["shape"][0] == "precompiled"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fresh cache dir with the tiny model's decode step and few-token forward saved whole."""
    root = tmp_path_factory.mktemp("precompiled")
    old = os.environ.get("FMSTACK_CACHE_DIR")
    os.environ["FMSTACK_CACHE_DIR"] = str(root)
    try:
        model = load_model("random:tiny-gqa", seed=0).model
        gen = Generator(model, eos_ids=[], compile=True, max_seq_len=64)
        ids = gen.generate(PROMPT, PARAMS)[0].token_ids
        with torch.inference_mode():
            cache = gen.ensure_cache(1, 64)
            cache.reset(torch.tensor([0]))
            gen.logits(torch.tensor([[3, 4]]), torch.tensor([[0, 1]]), cache)
    finally:
        if old is None:
            os.environ.pop("FMSTACK_CACHE_DIR", None)
        else:
            os.environ["FMSTACK_CACHE_DIR"] = old
    return {"root": root, "ids": ids, "entries": entries(root)}


def test_both_steps_are_saved_whole(saved):
    steps = sorted(key["step"] for key in saved["entries"].values())
    assert steps == ["decode step", "forward (few tokens)"]
    for key in saved["entries"].values():
        meta = key["meta"]
        assert "fmstack.models.llama" in meta["sources"] and "fmstack.backends.inductor" in meta["sources"]
        assert meta["isa"] and meta["bytes"] > 0


def test_second_process_runs_the_saved_step_without_tracing(saved):
    env = {**os.environ, "FMSTACK_CACHE_DIR": str(saved["root"]),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", WARM], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    warm = json.loads(done.stdout.strip().splitlines()[-1])
    assert warm["ids"] == saved["ids"]
    assert warm["graphs"] == 0 and warm["frames"] == 0  # Dynamo compiled nothing
    assert not [p for p in warm["phases"] if "tracing" in p or "build_guards" in p or "compile_fx" in p]
    assert warm["autograd_cache_miss"] == 0 and warm["fxgraph_cache_miss"] == 0
    assert "loaded compiled decode step (batch 1, greedy)" in done.stderr
    assert entries(saved["root"]) == saved["entries"]  # nothing written again


def test_entry_serves_other_weights_and_equals_eager(saved, monkeypatch):
    monkeypatch.setenv("FMSTACK_CACHE_DIR", str(saved["root"]))
    model = load_model("random:tiny-gqa", seed=1).model  # same key, other weights than the saved run's
    gen = Generator(model, eos_ids=[], compile=True, max_seq_len=64)
    eager = Generator(model, eos_ids=[], max_seq_len=64)
    before = compile_counters()["graphs"]
    with torch.inference_mode():  # as the saved step's arguments were made (Dynamo guards on it)
        tokens, positions = torch.tensor([[5, 9]]), torch.tensor([[0, 1]])
        caches = [model.make_cache(1, 64, StaticKVCache, dtype=torch.float32) for _ in range(2)]
        for c in caches:
            c.reset(torch.tensor([0]))
        compiled_logits = gen.logits(tokens, positions, caches[0]).clone()
        eager_logits = eager.logits(tokens, positions, caches[1])
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert gen.generate(PROMPT, PARAMS)[0].token_ids == eager.generate(PROMPT, PARAMS)[0].token_ids
    assert compile_counters()["graphs"] == before  # both steps loaded, nothing traced
    assert entries(saved["root"]) == saved["entries"]


def test_argument_shapes_and_compile_settings_are_in_the_key():
    model = load_model("random:tiny-gqa", seed=0).model
    cache = {n: Generator(model, max_seq_len=n).ensure_cache(1, n) for n in (64, 128)}
    step = (torch.tensor([[1]]), torch.tensor([[0]]))
    words = {variant((*step, cache[64])), variant((*step, cache[128])),  # another cache length
             variant((torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache[64])),  # another token count
             variant((torch.tensor([[1]]).float(), torch.tensor([[0]]), cache[64]))}  # another dtype
    assert len(words) == 4
    marked = torch.tensor([[1, 2, 3]])
    mark_dynamic(marked, 1)
    assert variant((marked,)) == ("int64[1,s]+autograd",)  # a dynamic length is one key for all lengths
    with torch.inference_mode():
        assert variant((torch.tensor([[1, 2, 3]]),)) == ("int64[1,3]",)
    settings = {compile_settings(decode_compile_kwargs("cpu", rows, "model")) for rows in (0, 4, 8)}
    assert len(settings) == 3  # BLAS, 4-row and 8-row reductions are different builds
    assert compile_settings({"fullgraph": True, "options": {"guard_filter_fn": len}}) == compile_settings(
        {"fullgraph": True, "options": {}})
    threads = torch.get_num_threads()
    state = global_state()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)  # Dynamo's saved guards check the thread count
        assert global_state() != state
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        assert global_state() != state
    steps = {owner_state(Generator(model, sdpa_backend=name)._decode_impl) for name in ("auto", "math")}
    assert len(steps) == 2 and "model" not in "".join(steps)  # the SDPA choice, not the model

def copy_cache(saved, tmp_path) -> Path:
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(saved["root"], root)
    return root


def decode_entry(root: Path) -> Path:
    return Path(next(p for p, key in entries(root).items() if key["step"] == "decode step"))


def run_tiny(root: Path, monkeypatch) -> list[int]:
    monkeypatch.setenv("FMSTACK_CACHE_DIR", str(root))
    gen = Generator(load_model("random:tiny-gqa", seed=0).model, eos_ids=[], compile=True, max_seq_len=64)
    return gen.generate(PROMPT, PARAMS)[0].token_ids


@pytest.mark.parametrize("damage", ["truncated", "garbage with a matching checksum",
                                    pytest.param("stale source", marks=pytest.mark.slow)])  # ~4 s each
def test_damaged_entry_is_rebuilt(saved, tmp_path, monkeypatch, caplog, damage):
    import hashlib

    root = copy_cache(saved, tmp_path)
    path = decode_entry(root)
    key = json.loads(path.with_suffix(".json").read_text())
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage with a matching checksum":
        path.write_bytes(b"not a compiled step")
        key["meta"]["sha256"] = hashlib.sha256(b"not a compiled step").hexdigest()
    else:
        key["meta"]["sources"]["fmstack.models.llama"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(key))
    with caplog.at_level(logging.INFO, logger="fmstack"):
        assert run_tiny(root, monkeypatch) == saved["ids"]
    unreadable = [r for r in caplog.records if r.levelno == logging.WARNING and "is unreadable" in r.getMessage()]
    assert len(unreadable) == (0 if damage == "stale source" else 1)
    assert any("is stale" in r.getMessage() for r in caplog.records) == (damage == "stale source")
    rebuilt = json.loads(path.with_suffix(".json").read_text())["meta"]
    assert rebuilt["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rebuilt["sources"] == saved["entries"][str(path).replace(str(root), str(saved["root"]))]["meta"]["sources"]


@pytest.mark.slow  # another compile of the tiny model's decode step (~4 s); the unit test above covers the key
def test_another_cache_length_misses_and_is_saved(saved, tmp_path, monkeypatch):
    root = copy_cache(saved, tmp_path)
    monkeypatch.setenv("FMSTACK_CACHE_DIR", str(root))
    gen = Generator(load_model("random:tiny-gqa", seed=0).model, eos_ids=[], compile=True, max_seq_len=128)
    gen.generate(PROMPT, PARAMS)
    assert len(entries(root)) == len(saved["entries"]) + 1


def test_precompile_is_off_for_cuda_distributed_and_by_env(monkeypatch):
    from fmstack.generation.compile_cache import PRECOMPILE_ENV, precompile_wanted

    assert precompile_wanted({"device": "cpu"})
    assert not precompile_wanted({"device": "cuda"})
    monkeypatch.setenv(PRECOMPILE_ENV, "0")
    assert not precompile_wanted({"device": "cpu"})
    monkeypatch.delenv(PRECOMPILE_ENV)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert not precompile_wanted({"device": "cpu"})  # a tensor-parallel rank's graph holds its rank


def test_a_step_that_cannot_be_saved_whole_compiles_with_dynamo(saved, tmp_path, monkeypatch, caplog):
    import fmstack.backends.compile as compile_module

    def fail(*args, **kwargs):
        raise RuntimeError("no aot_compile here")

    monkeypatch.setattr(compile_module, "aot_compile", fail)
    monkeypatch.setattr(compile_module, "warn_once", lambda key, message: logging.getLogger("fmstack").warning(message))
    with caplog.at_level(logging.WARNING, logger="fmstack"):
        assert run_tiny(tmp_path / "empty", monkeypatch) == saved["ids"]  # a miss, then the Dynamo path
    warnings = [r.getMessage() for r in caplog.records if "cannot be saved whole" in r.getMessage()]
    assert len(warnings) == 1 and "no aot_compile here" in warnings[0]
    assert entries(tmp_path / "empty") == {}
    assert [e["key"]["shape"] for e in cache_entries(tmp_path / "empty" / "compile")] == [["batch 1", "greedy"]]


def test_cold_start_builds_the_decode_step_in_a_background_process(tmp_path, monkeypatch, caplog):
    """A cold compile of a longer prompt: the decode step compiles in a child process (tensors sent as
    layouts only) while this one compiles the prefill step; this process then loads the child's
    entry (one graph traced here, not two) and generates the eager tokens."""
    monkeypatch.setenv("FMSTACK_CACHE_DIR", str(tmp_path))
    model = load_model("random:tiny-gqa", seed=0).model
    prompt, params = [[3, 1, 4, 1, 5]], SamplingParams(max_new_tokens=5)
    expected = Generator(model, eos_ids=[], max_seq_len=64).generate(prompt, params)[0].token_ids
    before = compile_counters()["graphs"]
    with caplog.at_level(logging.INFO, logger="fmstack"):
        got = Generator(model, eos_ids=[], compile=True, max_seq_len=64).generate(prompt, params)[0].token_ids
    assert got == expected
    assert "compiling decode step (batch 1, greedy) in a background process" in caplog.text
    assert "loaded compiled decode step (batch 1, greedy)" in caplog.text
    assert compile_counters()["graphs"] - before == 1  # the prefill step; the decode step came from the child
    assert sorted(k["step"] for k in entries(tmp_path).values()) == ["decode step", "prefill"]
