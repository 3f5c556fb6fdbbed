"""Tensor parallel on 2 gloo ranks vs the single-process model (one torchrun job for all tiny cases).

Tolerance: fp32 logits within 1e-5 absolute (logits are O(1); the all-reduce sums partial
products in a different order, observed ~1e-6); greedy tokens identical; scored log-likelihoods
within 1e-4. int8: each rank's int8 weights and scales equal the single-process ones (row-parallel
scales are all-reduced, per expert for MoE w_down), so logits stay within 1e-4 and greedy tokens are identical.
"""

from __future__ import annotations

import pytest

from tests.parallel.conftest import WORKER, generate_cli, reference_ids, run_worker, torchrun

FP32 = ["mha", "gqa", "mqa", "kv3", "moe"]
INT8 = ["gqa", "kv3", "moe"]


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory):
    cases = [str(tiny_checkpoints[n]) for n in FP32] + [f"{tiny_checkpoints[n]}:int8" for n in INT8]
    return run_worker("tp", cases, tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("case", FP32)
def test_logits_and_scores_match_single_process(results, case):
    for r in results[case]:
        assert r["logits_shape"][-1] == {"mqa": 509}.get(case, 512)  # full vocab, padding cut off
        assert r["logits_scale"] > 0.5
        assert r["logits_max_abs"] <= 1e-5 and r["last_only_max_abs"] <= 1e-5
        assert r["score_max_abs"] <= 1e-4 and r["score_greedy_equal"]


@pytest.mark.parametrize("case", FP32 + [f"{n}:int8" for n in INT8])
def test_greedy_tokens_identical(results, case):
    for r in results[case]:
        assert r["tokens_par"] == r["tokens_ref"]


@pytest.mark.parametrize("case", [f"{n}:int8" for n in INT8])
def test_int8_logits_close(results, case):
    for r in results[case]:
        assert r["logits_max_abs"] <= 1e-4


def test_heads_split_and_shards_are_local(results):
    kv = {case: [r["kv_heads"] for r in results[case]] for case in FP32}
    assert kv == {"mha": [2, 2], "gqa": [1, 1], "mqa": [1, 1], "kv3": [2, 1], "moe": [1, 1]}  # mqa: replicated kv head
    for case in FP32:
        for r in results[case]:
            assert r["local_numel"] < 0.7 * r["full_numel"]  # norms are the only replicated weights


def test_cli_generate_matches_single_process(tiny_tok_checkpoint):
    out = generate_cli("tp", tiny_tok_checkpoint, n=16)
    assert out["token_ids"] == reference_ids(tiny_tok_checkpoint, 16)


@pytest.mark.slow
def test_default_model_cli_matches_single_process(smollm2_gguf):
    """The acceptance command on SmolLM2-135M (~50 s for the 2-rank run, ~40 s for the reference here)."""
    assert generate_cli("tp")["token_ids"] == reference_ids(smollm2_gguf, 32)


def test_bad_argument_on_one_rank_fails_on_rank0(tiny_checkpoints):
    res = torchrun(["-m", "fmstack", "bench", "--model", str(tiny_checkpoints["gqa"]), "--parallel", "tp",
                    "--batch-sizes", "1", "--new-tokens", "4", "--repeats", "1", "--no-compile"],
                   env={"FMSTACK_TEST_FAULT": "1:load:raise"})
    assert res.returncode != 0
    assert "fmstack: error: rank 1 failed: ParameterError: FMSTACK_TEST_FAULT" in res.stderr


def test_stalled_rank_times_out_with_error_on_rank0(tiny_checkpoints):
    """Rank 1 hangs at its 3rd forward: rank 0's collective fails after FMSTACK_DIST_TIMEOUT_S."""
    res = torchrun(["-m", "fmstack", "bench", "--model", str(tiny_checkpoints["gqa"]), "--parallel", "tp",
                    "--batch-sizes", "1", "--new-tokens", "4", "--repeats", "1", "--no-compile"],
                   env={"FMSTACK_TEST_FAULT": "1:forward:hang:3", "FMSTACK_DIST_TIMEOUT_S": "10"}, timeout=90)
    assert res.returncode != 0
    assert "FMSTACK_TEST_FAULT: rank 1 hang at forward" in res.stderr
    assert "fmstack: error: another rank exited or stalled" in res.stderr and "Timed out" in res.stderr


@pytest.mark.slow
def test_compiled_tp_generation_has_no_graph_breaks(tiny_checkpoints, tmp_path):
    """fullgraph prefill + decode with functional collectives on CPU/gloo (~75 s of compiling on 2 cores)."""
    import json

    out = tmp_path / "compile.json"
    res = torchrun([str(WORKER), "--mode", "tp", "--compile-check", "--out", str(out), str(tiny_checkpoints["gqa"])],
                   timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    for r in json.loads(out.read_text())["gqa"]:
        assert r["graph_breaks"] == {} and r["graphs"] == 2 and r["equal"] and r["second_length_ok"]
