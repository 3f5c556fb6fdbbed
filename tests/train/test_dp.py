"""Data parallel: FSDP2 over 2 gloo ranks gives the same loss curve and weights as 1 rank with the
same global batch; `fmstack finetune` under torchrun saves a loadable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.parallel.conftest import torchrun
from tests.train import dp_worker

WORKER = Path(dp_worker.__file__)


def test_two_ranks_match_one(tmp_path):
    out = tmp_path / "dp.json"
    res = torchrun([str(WORKER), str(out)], timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(out.read_text())
    for name, (spec, kw) in dp_worker.CASES.items():
        # one process, the same global batch: per-rank batch x 2 ranks
        ref = dp_worker.run_case(spec, {**kw, "batch_size": kw["batch_size"] * 2}, None, compile=False)
        assert got[name]["global_batch"] == ref["global_batch"]
        assert got[name]["losses"] == pytest.approx(ref["losses"], rel=1e-5), name
        assert got[name]["losses"][-1] < got[name]["losses"][0]
        assert set(got[name]["probe"]) == set(dp_worker.PROBE)
        for p in dp_worker.PROBE:
            assert got[name]["probe"][p] == pytest.approx(ref["probe"][p], rel=1e-3, abs=1e-4), (name, p)


@pytest.mark.slow
def test_finetune_cli_under_torchrun(tiny_tok_dir, tmp_path):
    """`torchrun -m fmstack finetune` (FSDP2; rank 0 alone prints and saves) == the 1-process run with
    twice the batch; the saved directory generates."""
    import io
    from contextlib import redirect_stdout

    from fmstack.cli import main
    from tests.train.conftest import QA, write_jsonl

    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    common = ["finetune", "--model", str(tiny_tok_dir), "--data", str(data), "--lora-rank", "4", "--steps", "4",
              "--lr", "5e-3", "--json"]
    res = torchrun(["-m", "fmstack", *common, "--out", str(tmp_path / "dp"), "--batch-size", "2"], timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    dp = json.loads(lines[0])
    assert dp["parallel"] == "fsdp" and dp["world_size"] == 2 and dp["global_batch"] == 4
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    one = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert one["parallel"] == "none"
    assert dp["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert main(["generate", "--model", str(tmp_path / "dp"), "--max-new-tokens", "4", "Hello"]) == 0
