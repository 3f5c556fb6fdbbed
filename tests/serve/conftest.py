"""Server fixtures: `fmstack serve` as a real subprocess on 127.0.0.1 (free port), polled until /health.

Most tests serve `tiny_ckpt`: a small random model (2 layers, dim 64) with SmolLM2's vocabulary and
tokenizer (chat template included), saved as an fmstack checkpoint, so text, chat and streaming
run through the real tokenizer at a fraction of the real model's cost on CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None):
        self.api_key = api_key  # sent to /metrics by metrics()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        env.pop("FMSTACK_API_KEY", None)
        if not {"--compile", "--no-compile"} & set(args):  # the HTTP tests serve eager: a compiled server spends
            args = ["--no-compile", *args]  # minutes compiling (the compiled engine: tests/serve/test_runner.py)
        self.proc = subprocess.Popen([sys.executable, "-m", "fmstack", "serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not come up in {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        """/metrics samples without labels' values: name -> value (first sample of each name)."""
        out: dict[str, float] = {}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for line in httpx.get(self.url + "/metrics", timeout=10, headers=headers).text.splitlines():
            if line and not line.startswith("#"):
                name_labels, value = line.rsplit(" ", 1)
                out.setdefault(name_labels.split("{")[0], float(value))
        return out

    def client(self, **kw):
        from openai import OpenAI

        kw.setdefault("api_key", "none")
        return OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, smollm2_gguf) -> Path:
    """Random 2-layer model with SmolLM2's vocabulary and tokenizer, as an fmstack checkpoint."""
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.config import ModelConfig
    from fmstack.models.build import build_model
    from fmstack.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    cfg = ModelConfig(name="tiny-smollm2-vocab", vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=128, max_seq_len=512, tie_embeddings=True, rope_theta=10000.0)
    model = build_model(cfg)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", model, tok, source="random test model")


@pytest.fixture(scope="session")
def server(tiny_ckpt, tmp_path_factory):
    s = ServerProcess(["--model", str(tiny_ckpt), "--served-model-name", "tiny", "--max-num-seqs", "32",
                       "--max-model-len", "256", "--block-size", "8", "--kv-cache-mb", "16",
                       "--max-body-kb", "64"], tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()
