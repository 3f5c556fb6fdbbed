"""`fmstack bench` end to end on a tiny random model: runs, prints the table, writes the JSON
(fields only; no timing assertions, the machine is shared)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fmstack", "bench", "--model", "random:tiny-mha", "--batch-sizes", "1,2",
         "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1", "--no-compile", "--threads", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)  # not the repo: the CLI must find benchmarks/
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tok/s" in proc.stdout and "fmstack" in proc.stdout
    # the warm-up says what it runs and why
    assert "warm-up fmstack batch 1: 4 untimed tokens (eager: no compilation, faults in the weights" in proc.stderr
    report = json.loads(out.read_text())
    meta = report["meta"]
    for key in ("date", "device", "device_name", "torch", "threads", "load_avg_start", "model", "dtype",
                "prompt_len", "new_tokens", "repeats", "batch_sizes"):
        assert key in meta, key
    assert meta["threads"] == 1 and meta["batch_sizes"] == [1, 2] and meta["compile"] is False
    assert report["systems"]["fmstack"]["weight_bytes"] > 0
    assert report["systems"]["fmstack"]["sdpa_backend_chosen"] in ("flash (cpu)", "math")  # the cache masks
    rows = report["results"]
    assert [(r["system"], r["batch_size"]) for r in rows] == [("fmstack", 1), ("fmstack", 2)]
    for r in rows:
        for key in ("decode_tok_s", "ms_per_step", "prefill_tok_s", "ttft_s", "weight_gb_s"):
            stats = r[key]
            assert stats["min"] <= stats["median"] <= stats["max"] and stats["median"] > 0
            assert len(stats["values"]) == 1
        assert r["peak_mb"] > 0
        assert r["ratio_vs_hf_eager"] is None  # no --peers hf
        floor = 1e3 * report["systems"]["fmstack"]["weight_bytes"] / (meta["read_gb_s"] * 1e9)
        assert r["weights_floor_ms"] == pytest.approx(floor, abs=1e-3)
        assert r["outside_weights_ms"] == pytest.approx(r["ms_per_step"]["median"] - r["weights_floor_ms"], abs=1e-3)


def test_bench_rejects_bad_batch_sizes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fmstack", "bench", "--model", "random:tiny-mha",
                           "--batch-sizes", "1,x", "--no-compile"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--batch-sizes" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_quantized_modes_and_speculative_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fmstack", "bench", "--model", "random:tiny-gqa", "--batch-sizes", "1,2",
         "--new-tokens", "5", "--prompt-len", "6", "--repeats", "1", "--no-compile", "--threads", "1",
         "--quantize", "none,int8,int4", "--draft-quantize", "int8", "--speculate-k", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = [(r["system"], r["batch_size"]) for r in report["results"]]
    assert rows == [("fmstack", 1), ("fmstack", 2), ("fmstack-int8", 1), ("fmstack-int8", 2),
                    ("fmstack-int4", 1), ("fmstack-int4", 2), ("fmstack-spec", 1)]  # speculative: batch 1 only
    spec = report["results"][-1]
    assert 0 <= spec["acceptance_rate"] <= 1 and 0 <= spec["mean_accepted"] <= 2
    assert spec["ratio_vs_fmstack"] > 0 and report["results"][0]["ratio_vs_fmstack"] == 1.0
    assert report["meta"]["speculative"] == {"draft_model": None, "draft_quantize": "int8", "speculate_k": 2}
    assert "acceptance" in proc.stdout


@pytest.mark.parametrize("args, msg", [
    (["--quantize", "int3"], "--quantize"),
    (["--peers", "vllm"], "unknown peer"),
    (["--speculate-k", "0", "--draft-quantize", "int8"], "--speculate-k"),
    (["--quantize", "int8", "--draft-quantize", "int8"], "include 'none'"),
    (["--speculate-k", "3"], "--speculate-k needs a draft"),
    (["--parallel", "cp"], "--parallel cp: fmstack bench runs none, tp or pp"),
])
def test_bench_argument_errors(args, msg, capsys):
    from fmstack.cli import main  # in process (a subprocess per case cost ~10 s each); exit codes as the CLI's

    assert main(["bench", "--model", "random:tiny-mha", "--no-compile", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_compile_counts_see_compiles_and_recompiles():
    """The counters behind each row's `compiles`: a first call compiles, a repeat does not, a new shape
    recompiles (dynamo's eager backend: no code generation, milliseconds)."""
    import torch

    from fmstack.bench.measure import compile_counts, compile_counts_since

    f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    start = compile_counts()
    f(torch.ones(3))
    first = compile_counts_since(start)
    mid = compile_counts()
    f(torch.ones(3))
    assert compile_counts_since(mid)["graphs"] == 0
    f(torch.ones(5))
    assert first["graphs"] == 1 and first["graph_breaks"] == 0
    assert compile_counts_since(mid)["graphs"] == 1  # the recompile for the new shape


def test_bench_compile_counts_and_hf_peer_on_random_model(tmp_path):
    """--peers hf on a random:<config> model builds an HF model of the same shape (HF's random init);
    every row reports what was compiled in the warm-up and in the timed runs (nothing, with --no-compile)."""
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fmstack", "bench", "--model", "random:tiny-mha", "--batch-sizes", "1",
         "--new-tokens", "3", "--prompt-len", "4", "--repeats", "1", "--no-compile", "--threads", "1",
         "--peers", "hf", "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["system"], r["batch_size"]) for r in report["results"]] == [("fmstack", 1), ("hf-eager", 1)]
    hf_bytes, ours = report["systems"]["hf-eager"]["weight_bytes"], report["systems"]["fmstack"]["weight_bytes"]
    assert abs(hf_bytes - ours) <= 0.01 * ours  # same shape (HF adds its small RoPE buffers)
    zero = {"graphs": 0, "frames": 0, "graph_breaks": 0, "cudagraph_skips": 0}
    assert report["meta"]["compile_counters"] == zero
    for r in report["results"]:
        assert r["compiles"] == {"warmup": zero, "timed": zero}
        assert r["ratio_vs_hf_eager"] > 0
