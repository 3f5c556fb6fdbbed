"""The persistent compile cache (`fmstack.generation.compile_cache`), its bundles of cache artifacts
(whole saved steps off, $FMSTACK_PRECOMPILE=0: tests/generation/test_compile_precompile.py covers
those): a second process loads a compiled step instead of lowering and building it again, a changed
key misses, a corrupt entry is rebuilt with one warning. Each run is a fresh process: the first two keep Inductor's directory in
fmstack's cache (the warm start: AOTAutograd's cache hits, no C++ is built), the others have their own
empty Inductor directory, so only fmstack's bundle can carry a compiled graph to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmstack.generation.compile_cache import CompileCache, cache_entries, clear_cache, model_fingerprint
from fmstack.loading import load_model

RUN = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
from fmstack.backends import cache_counters
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model
model = load_model("random:tiny-gqa", seed=0).model
gen = Generator(model, eos_ids=[], compile=True, max_seq_len=64)
prompts = [[7]] * int(sys.argv[1])
out = gen.generate(prompts, SamplingParams(max_new_tokens=4))
print(json.dumps({"ids": [r.token_ids for r in out], **cache_counters()}))
"""


def run(tmp_path: Path, name: str | None, batch: int) -> tuple[dict, str]:
    """RUN in a fresh process with fmstack's cache under tmp_path and Inductor's in `inductor-<name>`
    (name None: Inductor's directory is not set, so fmstack puts it in its own cache)."""
    env = {**os.environ, "FMSTACK_CACHE_DIR": str(tmp_path / "fmstack"), "FMSTACK_PRECOMPILE": "0",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    if name is None:
        del env["TORCHINDUCTOR_CACHE_DIR"]
    done = subprocess.run([sys.executable, "-c", RUN, str(batch)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow  # CI time (20 min on 2 cores): run with -m slow
def test_second_process_loads_instead_of_compiling_and_a_key_change_misses(tmp_path):
    cold, _ = run(tmp_path, None, 1)
    assert cold["fxgraph_cache_miss"] >= 1 and cold["fxgraph_cache_hit"] == 0
    entries = cache_entries(tmp_path / "fmstack" / "compile")
    assert len(entries) == 1 and entries[0]["key"]["shape"] == ["batch 1", "greedy"]
    libraries = sorted((tmp_path / "fmstack" / "inductor").rglob("*.so"))
    assert libraries  # Inductor's built kernels live in fmstack's cache

    again, _ = run(tmp_path, None, 1)  # the warm start: AOTAutograd's cache hits, no C++ is built
    assert again["ids"] == cold["ids"]
    assert again["autograd_cache_hit"] >= 1 and again["autograd_cache_miss"] == 0
    assert again["fxgraph_cache_miss"] == 0
    assert sorted((tmp_path / "fmstack" / "inductor").rglob("*.so")) == libraries

    warm, _ = run(tmp_path, "warm", 1)  # an empty Inductor directory: the bundle alone carries the graphs
    assert warm["ids"] == cold["ids"]
    # hits only: nothing lowered, generated or built again (AOTAutograd's cache hits where it is used;
    # otherwise Inductor's FX graph cache does)
    assert warm["fxgraph_cache_hit"] + warm["autograd_cache_hit"] >= 1
    assert warm["fxgraph_cache_miss"] == 0 and warm["autograd_cache_miss"] == 0

    other, _ = run(tmp_path, "batch2", 2)  # another batch size: another key, compiled and stored
    assert other["fxgraph_cache_miss"] >= 1
    assert len(cache_entries(tmp_path / "fmstack" / "compile")) == 2

    path = Path(entries[0]["path"])
    path.write_bytes(b"not a bundle")
    rebuilt, err = run(tmp_path, "corrupt", 1)
    assert rebuilt["ids"] == cold["ids"]
    assert err.count("is unreadable") == 1  # fmstack's one warning (torch logs its own too)
    assert path.stat().st_size > len(b"not a bundle")  # compiled again and saved


def test_key_covers_dtype_quantization_config_torch_isa_and_step(tmp_path):
    import copy

    from fmstack.quant import QuantSpec, quantize_model

    model = load_model("random:tiny-gqa", seed=0).model
    other_config = load_model("random:tiny-mha", seed=0).model
    base = CompileCache.for_model(model, torch.float32, tmp_path)
    paths = {base.path("decode step", ("batch 1", "greedy")),
             base.path("decode step", ("batch 2", "greedy")),
             base.path("decode step", ("batch 1", "sampled")),
             base.path("prefill", ("batch 1", "greedy")),
             CompileCache.for_model(model, torch.bfloat16, tmp_path).path("decode step", ("batch 1", "greedy")),
             CompileCache.for_model(quantize_model(copy.deepcopy(model), QuantSpec("int8")), torch.float32, tmp_path)
             .path("decode step", ("batch 1", "greedy")),
             CompileCache.for_model(other_config, torch.float32, tmp_path).path("decode step", ("batch 1", "greedy"))}
    fingerprint = model_fingerprint(model, torch.float32)
    for field, value in (("torch", "2.99.0"), ("isa", "NO-ISA"), ("native", not fingerprint["native"])):
        paths.add(CompileCache({**fingerprint, field: value}, tmp_path).path("decode step", ("batch 1", "greedy")))
    assert len(paths) == 10
    assert fingerprint["torch"] == torch.__version__ and fingerprint["isa"]
    assert base.path("prefill", ("batch 1",)) == CompileCache(fingerprint, tmp_path).path("prefill", ("batch 1",))


def test_missing_entry_is_a_miss_and_clear_empties(tmp_path):
    cache = CompileCache({"model": "x"}, tmp_path / "compile")
    assert not cache.load("decode step", ("batch 1",))
    cache.path("decode step", ("batch 1",)).parent.mkdir(parents=True)
    cache.path("decode step", ("batch 1",)).write_bytes(b"x" * 10)
    assert [e["bytes"] for e in cache_entries(tmp_path / "compile")] == [10]
    assert clear_cache(tmp_path / "compile") == 10
    assert cache_entries(tmp_path / "compile") == []


@pytest.mark.parametrize("rows", [4, 8])
def test_backend_key_differs_by_row_limit(rows):
    from fmstack.backends.inductor import decomposition_key, decomposition_key_pass

    assert decomposition_key_pass(rows).uuid() == decomposition_key(rows)
    assert decomposition_key(rows) != decomposition_key(rows + 1)
    import pickle

    assert pickle.loads(pickle.dumps(decomposition_key_pass(rows))).uuid() == decomposition_key(rows)


def test_cache_command_info_and_clear(tmp_path, monkeypatch, capsys):
    from fmstack.cli import main

    monkeypatch.setenv("FMSTACK_CACHE_DIR", str(tmp_path))
    cache = CompileCache({"config": {"n_layers": 3, "dim": 64}, "dtype": "torch.float32", "quant": None}, None)
    assert cache.root == tmp_path / "compile"
    cache.root.mkdir()
    cache.path("decode step", ("batch 1", "greedy")).write_bytes(b"x" * 2048)
    cache.path("decode step", ("batch 1", "greedy")).with_suffix(".json").write_text(
        json.dumps(cache.key("decode step", ("batch 1", "greedy"))))
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "1 entries" in out and "decode step (batch 1, greedy)" in out and "n_layers 3" in out
    assert main(["cache", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"][0]["bytes"] == 2048
    assert main(["cache", "clear"]) == 0
    assert not cache.root.exists()
    assert main(["cache", "info"]) == 0 and "0 entries" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [("1,x", "comma list of positive integers"), ("0", "must be >= 1"),
                                           (",", "is empty")])
def test_compile_command_rejects_bad_batch_sizes(text, message, capsys):
    from fmstack.cli import main

    assert main(["compile", "--model", "random:tiny-gqa", "--batch-sizes", text]) == 2
    assert message in capsys.readouterr().err
