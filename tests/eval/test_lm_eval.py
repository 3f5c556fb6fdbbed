"""The lm-eval model `fmstack`: lm-eval's own CLI (through `python -m fmstack.eval.lm_eval_adapter`) on a
local HellaSwag task (JSON file, preprocessing in the task's utils.py, no hub access) gives the same
acc / acc_norm as `fmstack eval hellaswag`; loglikelihood_rolling and generate_until against direct
computations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fmstack.eval import hellaswag as hs

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

N_ROWS = 10

TASK_YAML = """\
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# The task's own preprocessing, written from the convention (not imported from fmstack).
TASK_UTILS = '''\
import re


def clean(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\\[.*?\\]", "", text).replace("  ", " ")


def process_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": clean(doc["activity_label"] + ": " + ctx),
                "choices": [clean(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(one)
'''


@pytest.mark.slow  # CI time (20 min on 2 cores): run with -m slow
def test_lm_eval_cli_matches_fmstack_hellaswag(tmp_path, ours, smollm2_gguf, hellaswag_dev):
    docs = hs.load_docs(hellaswag_dev, N_ROWS)
    task_dir, out_dir = tmp_path / "tasks", tmp_path / "out"
    task_dir.mkdir()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "hellaswag_local.yaml").write_text(TASK_YAML.format(data=data))
    (task_dir / "utils.py").write_text(TASK_UTILS)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "fmstack.eval.lm_eval_adapter", "run", "--model", "fmstack",
           "--model_args", f"model={smollm2_gguf},dtype=fp32,batch_size=8", "--device", "cpu",
           "--include_path", str(task_dir), "--tasks", "hellaswag_local", "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"]["hellaswag_local"]
    expected = hs.evaluate(ours.model, ours.tokenizer, docs).metrics
    assert results["acc,none"] == pytest.approx(expected["acc"])
    assert results["acc_norm,none"] == pytest.approx(expected["acc_norm"])
    assert results["acc_stderr,none"] == pytest.approx(expected["acc_stderr"])


@pytest.fixture(scope="module")
def adapter(smollm2_gguf):
    from fmstack.eval.lm_eval_adapter import FmstackLM

    return lm_eval.api.registry.get_model("fmstack").create_from_arg_string(
        f"model={smollm2_gguf},batch_size=4,max_length=16", {"batch_size": 1, "device": "cuda:0"}), FmstackLM


def instance(request_type, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=0)


def test_registered_and_model_args_win(adapter):
    lm, cls = adapter
    assert isinstance(lm, cls)
    assert lm.batch_size == 4 and lm.max_length == 16 and lm._device.type == "cpu"  # cuda:0 default falls back
    assert "hf" in lm_eval.api.registry.model_registry  # built-in models still registered


def test_loglikelihood_rolling_equals_direct_sum(adapter, ours):
    lm, _ = adapter
    text = ("The fishermen prepared their nets before dawn, talking quietly about the weather and the price of "
            "bread. Nobody expected the storm that arrived that afternoon, nor the strange ship it left behind.")
    got = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))], disable_tqdm=True)[0]
    tok = ours.tokenizer
    ids = [tok.bos_id, *tok.encode(text, add_bos=False)]
    assert len(ids) > 2 * 16  # several windows of max_length=16
    expected = 0.0
    with torch.no_grad():  # each token predicted once, from at most 16 tokens of context (lm-eval's rule)
        for start in range(1, len(ids), 16):
            end = min(start + 16, len(ids))
            window = ids[max(0, end - 17):end]
            logp = ours.model(torch.tensor([window[:-1]]))[0].float().log_softmax(-1)
            n = end - start
            expected += sum(logp[len(window) - 1 - n + i, window[len(window) - n + i]].item() for i in range(n))
    assert got == pytest.approx(expected, abs=1e-3)


def test_loglikelihood_pairs(adapter, ours):
    lm, _ = adapter
    reqs = [instance("loglikelihood", ("The capital of France is", " Paris")),
            instance("loglikelihood", ("The capital of France is ", "Paris"))]  # trailing space moves
    (a, ga), (b, gb) = lm.loglikelihood(reqs, disable_tqdm=True)
    assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_generate_until_equals_greedy_generator(adapter, ours, monkeypatch):
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams

    lm, _ = adapter
    monkeypatch.setattr(lm, "max_length", 64)  # room for prompt + max_gen_toks
    prompt = "List three colors: red,"
    got = lm.generate_until([instance("generate_until", (prompt, {"until": ["\n"], "max_gen_toks": 12,
                                                                  "do_sample": False}))], disable_tqdm=True)[0]
    ref = Generator(ours.model, ours.tokenizer).generate([ours.tokenizer.encode(prompt)],
                                                         SamplingParams(max_new_tokens=12, stop=("\n",)))[0]
    assert got == ref.text and "\n" not in got
