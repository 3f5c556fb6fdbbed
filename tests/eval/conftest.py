"""Session-wide models for the eval tests: fmstack and HF transformers on the default SmolLM2 GGUF (fp32)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def ours(smollm2_gguf):
    from fmstack.loading import load_model

    return load_model(str(smollm2_gguf))


@pytest.fixture(scope="session")
def hf(smollm2_gguf):
    """(model, tokenizer) from HF transformers, reading the same GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
