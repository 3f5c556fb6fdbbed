"""`fmstack bench --whole-command` on a tiny random Llama with SmolLM2's tokenizer (an HF directory): the
fmstack child cold and warm, the HF peer script, the JSON fields and the markdown table (no timing
assertions: the machine is shared)."""

import json
import subprocess
import sys

import pytest
import torch

from fmstack.bench import peer_command
from tests.conftest import hf_llama_config


@pytest.fixture(scope="module")
def tiny_dir(smollm2_gguf, tmp_path_factory):
    """A tiny random HF Llama (SmolLM2's vocabulary) saved with save_pretrained, with SmolLM2's tokenizer."""
    from transformers import LlamaForCausalLM

    from fmstack.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(hf_llama_config("llama2", vocab_size=49152)).save_pretrained(path)
    load_tokenizer(smollm2_gguf).save(path)
    return path


def test_whole_command_writes_json(tiny_dir, tmp_path):
    out = tmp_path / "wait.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fmstack", "bench", "--whole-command", "--model", str(tiny_dir), "--new-tokens", "4",
         "--repeats", "1", "--threads", "1", "--generate-args", "--ignore-eos --seed 3", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    meta = report["meta"]
    assert meta["mode"] == "whole-command" and meta["threads"] == 1 and meta["new_tokens"] == 4
    assert meta["generate_args"] == "--ignore-eos --seed 3"
    # the flags the child ran with, defaults included, as it parsed them
    assert meta["fmstack_flags"]["ignore_eos"] is True and meta["fmstack_flags"]["seed"] == 3
    assert meta["fmstack_flags"]["max_new_tokens"] == 4 and isinstance(meta["fmstack_compile"], bool)
    assert meta["fmstack_command"][-1] == meta["prompt_text"]
    rows = report["results"]
    assert [(r["system"], r["phase"]) for r in rows] == [("fmstack", "cold"), ("fmstack", "warm")]
    for r in rows:
        assert r["tokens"] == [4] and r["prompt_tokens"] > 1
        for key in ("wall_s", "ttft_s", "load_s", "prefill_s", "decode_tok_s"):
            assert r[key]["min"] <= r[key]["median"] <= r[key]["max"] and r[key]["median"] > 0, key
        # the first token comes after the load and before the process exits
        assert r["load_s"]["median"] < r["ttft_s"]["median"] < r["wall_s"]["median"]
        assert r["wall_speedup_vs_hf_eager"] is None  # no --peers hf
    assert "| fmstack | cold |" in proc.stdout and "| fmstack | warm |" in proc.stdout


def test_hf_peer_script(tiny_dir, tmp_path):
    events = tmp_path / "events.jsonl"
    threads = torch.get_num_threads()
    record = peer_command.run(["hf", "The lighthouse", "--model", str(tiny_dir), "--max-new-tokens", "5",
                               "--threads", "1", "--ignore-eos", "--events", str(events)])
    assert record["text"].strip() and torch.get_num_threads() == threads  # the caller's thread count kept
    rec = json.loads(events.read_text())
    assert rec["system"] == "hf" and rec["tokens"] == 5 and rec["prompt_tokens"] >= 2
    assert rec["first_token_time"] <= rec["end_time"] and rec["load_s"] > 0 and rec["decode_s"] > 0


@pytest.mark.parametrize("args, msg", [
    (["--model", "random:tiny-mha"], "has no tokenizer"),
    (["--quantize", "int8"], "through --generate-args"),
    (["--no-compile"], "through --generate-args"),
    (["--peers", "vllm"], "unknown peer"),
])
def test_whole_command_argument_errors(args, msg, capsys, monkeypatch):
    from fmstack.cli import main  # in process: checked before anything loads or starts

    monkeypatch.setenv("FMSTACK_COMPILE", "1")  # compiled by default, as for a user: --no-compile is a change

    assert main(["bench", "--whole-command", *args]) == 2
    assert msg in capsys.readouterr().err
