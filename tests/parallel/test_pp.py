"""Pipeline parallel on 2 gloo ranks vs the single-process model (one torchrun job for all tiny cases,
Mixtral-style MoE included).

Stages run the same kernels on the same shapes as the single process, so generation logits are
bitwise equal in practice; asserted within 1e-5 (fp32) like tensor parallel. Scoring goes through
the micro-batched `hidden_states` (2 micro-batches) and the broadcasting head: within 1e-4.
"""

from __future__ import annotations

import pytest

from tests.parallel.conftest import WORKER, generate_cli, reference_ids, run_worker, torchrun

FP32 = ["mha", "gqa", "mqa", "kv3", "moe"]


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory):
    cases = [str(tiny_checkpoints[n]) for n in FP32] + [f"{tiny_checkpoints['gqa']}:int8"]
    return run_worker("pp", cases, tmp_path_factory.mktemp("pp"))


@pytest.mark.parametrize("case", FP32)
def test_logits_and_scores_match_single_process(results, case):
    for r in results[case]:
        assert r["logits_max_abs"] <= 1e-5 and r["last_only_max_abs"] <= 1e-5
        assert r["score_max_abs"] <= 1e-4 and r["score_greedy_equal"]


@pytest.mark.parametrize("case", FP32 + ["gqa:int8"])
def test_greedy_tokens_identical(results, case):
    for r in results[case]:
        assert r["tokens_par"] == r["tokens_ref"]


def test_stages_hold_only_their_layers(results):
    assert [r["layers"] for r in results["gqa"]] == [[0, 1], [2]]
    assert [r["layers"] for r in results["mha"]] == [[0], [1]]
    for case in FP32:
        first, last = results[case]
        assert first["local_numel"] < first["full_numel"] and last["local_numel"] < last["full_numel"]


def test_cli_generate_matches_single_process(tiny_tok_checkpoint):
    out = generate_cli("pp", tiny_tok_checkpoint, n=16)
    assert out["token_ids"] == reference_ids(tiny_tok_checkpoint, 16)


@pytest.mark.slow
def test_default_model_cli_matches_single_process(smollm2_gguf):
    """The acceptance command on SmolLM2-135M (~50 s for the 2-rank run, ~40 s for the reference here)."""
    assert generate_cli("pp")["token_ids"] == reference_ids(smollm2_gguf, 32)


def test_rank_that_dies_mid_run_fails_the_job_with_error_on_rank0(tiny_checkpoints):
    """Rank 1 exits (code 3) at its 3rd forward: rank 0's recv/broadcast fails at once."""
    res = torchrun(["-m", "fmstack", "bench", "--model", str(tiny_checkpoints["gqa"]), "--parallel", "pp",
                    "--batch-sizes", "1", "--new-tokens", "4", "--repeats", "1", "--no-compile"],
                   env={"FMSTACK_TEST_FAULT": "1:forward:exit:3"}, timeout=90)
    assert res.returncode != 0
    rank0 = [ln for ln in res.stderr.splitlines() if ln.startswith("fmstack: error:")]
    assert rank0, res.stderr[-3000:]
    assert "another rank" in rank0[0]


@pytest.mark.slow
def test_compiled_stage_generation(tiny_checkpoints, tmp_path):
    import json

    out = tmp_path / "compile.json"
    res = torchrun([str(WORKER), "--mode", "pp", "--compile-check", "--out", str(out), str(tiny_checkpoints["gqa"])],
                   timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    for r in json.loads(out.read_text())["gqa"]:
        assert r["graph_breaks"] == {} and r["graphs"] == 2 and r["equal"] and r["second_length_ok"]
