"""lm-eval's `local-completions` model, pointed at `fmstack serve`, scores a local HellaSwag task
(20 rows) exactly as `fmstack eval hellaswag` does: same per-choice log-likelihoods, same acc /
acc_norm. lm-eval tokenizes through the server's /tokenize route (its remote tokenizer backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fmstack.eval import hellaswag as hs
from tests.eval.test_lm_eval import TASK_UTILS, TASK_YAML

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test]')")

N_ROWS = 20


def run_lm_eval(url: str, model_name: str, tmp_path, docs) -> tuple[dict, list[dict]]:
    task_dir, out_dir = tmp_path / "tasks", tmp_path / "out"
    task_dir.mkdir()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "hellaswag_local.yaml").write_text(TASK_YAML.format(data=data))
    (task_dir / "utils.py").write_text(TASK_UTILS)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false", OPENAI_API_KEY="unused")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
           "--model_args", f"model={model_name},base_url={url}/v1/completions,num_concurrent=4,max_retries=1,"
                           "tokenizer_backend=remote",
           "--include_path", str(task_dir), "--tasks", "hellaswag_local", "--output_path", str(out_dir),
           "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"]["hellaswag_local"]
    samples = [json.loads(ln) for ln in next(out_dir.rglob("samples_hellaswag_local_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


@pytest.mark.slow  # CI time (20 min on 2 cores): run with -m slow
def test_lm_eval_local_completions_matches_fmstack_eval(server, tiny_ckpt, tmp_path, hellaswag_dev):
    from fmstack.loading import load_model

    docs = hs.load_docs(hellaswag_dev, N_ROWS)
    results, samples = run_lm_eval(server.url, "tiny", tmp_path, docs)
    loaded = load_model(str(tiny_ckpt))
    expected = hs.evaluate(loaded.model, loaded.tokenizer, docs)
    assert len(samples) == N_ROWS
    for s, row in zip(samples, expected.rows):
        got = [float(r[0][0]) for r in s["resps"]]  # [[loglik, is_greedy]] per choice (logged as text)
        assert got == pytest.approx(row.loglik, abs=2e-3), s["doc_id"]
    m = expected.metrics
    assert results["acc,none"] == pytest.approx(m["acc"]) and results["acc_norm,none"] == pytest.approx(m["acc_norm"])
