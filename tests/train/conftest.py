"""Fixtures for the training tests: the SmolLM2 tokenizer, a tiny model that uses it, small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fmstack.config import ModelConfig

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "All that glitters is not gold. Fortune favours the bold.")


@pytest.fixture(scope="session")
def tokenizer(smollm2_gguf):
    from fmstack.checkpoints import open_checkpoint
    from fmstack.tokenizer import load_tokenizer

    ckpt = open_checkpoint(smollm2_gguf)
    return load_tokenizer(ckpt.tokenizer_path, gguf_metadata=ckpt.metadata)


@pytest.fixture(scope="session")
def tiny_tok_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny random model (2 layers, dim 64, GQA 4/2, tied, context 128) with SmolLM2's tokenizer."""
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.models.build import build_model

    cfg = ModelConfig(name="tiny-tok", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, ffn_dim=128, max_seq_len=128, tie_embeddings=True)
    model = build_model(cfg)
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    return save_checkpoint(tmp_path_factory.mktemp("tiny-tok"), model, tokenizer)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


QA = [{"prompt": f"Q: what is {a} plus {b}?\nA:", "completion": f" {a + b}"} for a, b in
      [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (4, 4), (6, 3)]]


@pytest.fixture
def qa_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", QA)


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p
