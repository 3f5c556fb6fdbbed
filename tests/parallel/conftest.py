"""Tiny checkpoints covering the head/vocab/layer splits, and a bounded torchrun launcher.

Every 2-rank job runs in its own process group (session) with a hard timeout: a hang kills the
whole group and fails the test instead of stalling CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmstack.config import ModelConfig, named_config

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
TIMEOUT_S = 120

CONFIGS = {
    # MHA, tied: 2 heads and 2 layers per rank
    "mha": named_config("tiny-mha"),
    # GQA (8 q / 2 kv heads), untied, llama3 RoPE: one kv head per rank; 3 layers -> stages of 2 + 1
    "gqa": named_config("tiny-gqa"),
    # MQA: 2 ranks > 1 kv head, so it is replicated; odd vocab (padded shard) and odd ffn width
    "mqa": ModelConfig(name="tiny-mqa", vocab_size=509, dim=64, n_layers=3, n_heads=4, n_kv_heads=1,
                       ffn_dim=151, max_seq_len=128),
    # 3 kv heads on 2 ranks (like SmolLM2): uneven split of 2 + 1 kv groups; tied
    "kv3": ModelConfig(name="tiny-kv3", vocab_size=512, dim=96, n_layers=2, n_heads=6, n_kv_heads=3,
                       ffn_dim=192, max_seq_len=128, tie_embeddings=True),
    # Mixtral-style MoE: 4 experts, top-2; every expert's odd ffn width split 38 + 37
    "moe": ModelConfig(name="tiny-moe-tp", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_dim=75, max_seq_len=128, n_experts=4, n_experts_per_token=2),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """fmstack-format checkpoints of CONFIGS with random weights (std 0.1, so logits are O(1)) and
    random norms (a wrongly sharded or replicated norm shows)."""
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.models.build import build_model

    root = tmp_path_factory.mktemp("parallel-ckpts")
    out = {}
    for name, cfg in CONFIGS.items():
        model = build_model(cfg)
        g = torch.Generator().manual_seed(len(name))
        model.init_weights(std=0.1, generator=g)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.uniform_(0.5, 1.5, generator=g)
        out[name] = save_checkpoint(root / name, model)
    return out


def torchrun(args: list[str], env: dict[str, str] | None = None, nproc: int = 2,
             timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc ARGS` (gloo, 1 thread per rank); the whole process
    group is killed at `timeout` and the test fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} did not finish in {timeout}s (hang?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_worker(mode: str, cases: list[str], tmp_path: Path) -> dict:
    import json

    out = tmp_path / f"{mode}.json"
    res = torchrun([str(WORKER), "--mode", mode, "--out", str(out), *cases])
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def tiny_tok_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    """A tiny random model (2 layers, dim 64, GQA 4/2, tied) with SmolLM2's tokenizer and vocab, so
    the `fmstack generate` CLI path runs in seconds."""
    from fmstack.checkpoints import open_checkpoint
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.models.build import build_model
    from fmstack.tokenizer import load_tokenizer

    ckpt = open_checkpoint(smollm2_gguf)
    tok = load_tokenizer(ckpt.tokenizer_path, gguf_metadata=ckpt.metadata)
    cfg = ModelConfig(name="tiny-tok", vocab_size=ckpt.config.vocab_size, dim=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, ffn_dim=128, max_seq_len=256, tie_embeddings=True)
    model = build_model(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    return save_checkpoint(tmp_path_factory.mktemp("tiny-tok"), model, tok)


def reference_ids(model: str | Path, n: int) -> list[int]:
    """Single-process greedy ids of `fmstack generate --max-new-tokens n PROMPT` (computed in-process)."""
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.loading import load_model

    loaded = load_model(str(model))
    tok = loaded.tokenizer
    return Generator(loaded.model, tok).generate([tok.encode(PROMPT)], SamplingParams(max_new_tokens=n))[0].token_ids


def generate_cli(mode: str, model: str | Path | None = None, n: int = 32) -> dict:
    """The `--json` object of a 2-rank `fmstack generate --parallel MODE` (default model unless
    `model`); checks that rank 0 alone printed it."""
    import json

    args = ["-m", "fmstack", "generate", "--parallel", mode, "--max-new-tokens", str(n), "--json", PROMPT]
    res = torchrun(args + (["--model", str(model)] if model else []))
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, res.stdout  # the other rank's stdout is silenced
    return json.loads(lines[0])
