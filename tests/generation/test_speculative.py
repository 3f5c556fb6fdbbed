"""Speculative decoding: greedy == target greedy; sampling preserves the target distribution
(chi-square on a tiny vocabulary against the exact joint of the first two tokens); clear errors."""

import copy

import pytest
import torch

from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import SamplingParams, filtered_probs
from fmstack.generation.speculative import SpeculativeGenerator
from fmstack.loading import load_model
from fmstack.models.build import build_model
from fmstack.quant import QuantSpec, quantize_model


@pytest.fixture(scope="module")
def target():
    return load_model("random:tiny-gqa", seed=0).model


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft_kind", ["other-weights", "int8-self"])
def test_greedy_equals_target_greedy(target, k, draft_kind):
    if draft_kind == "int8-self":
        draft = quantize_model(copy.deepcopy(target), QuantSpec("int8"))
    else:
        draft = load_model("random:tiny-gqa", seed=1).model
    prompt = [7, 3, 99, 250, 4]
    params = SamplingParams(max_new_tokens=24)
    plain = Generator(target, eos_ids=[]).generate([prompt], params)[0].token_ids
    spec = SpeculativeGenerator(Generator(target, eos_ids=[]), Generator(draft, eos_ids=[]), k)
    out = spec.generate(prompt, params)
    assert out.token_ids == plain
    assert out.finish_reason == "length" and 0 <= out.acceptance_rate <= 1
    if draft_kind == "int8-self":
        assert out.acceptance_rate > 0.5  # a near-identical draft is mostly right


def tiny_vocab_model(seed: int):
    cfg = ModelConfig(name="v8", vocab_size=8, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      max_seq_len=64)
    m = build_model(cfg)
    m.init_weights(std=0.6, generator=torch.Generator().manual_seed(seed))
    return m.eval().requires_grad_(False)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.8, 5)])
def test_sampling_preserves_target_distribution(temperature, top_k):
    """Joint of the first two generated tokens (64 cells) from 1,500 seeded runs vs the exact target joint."""
    tgt, dft = tiny_vocab_model(0), tiny_vocab_model(1)
    prompt = [1, 2, 3]
    t, kk, p = torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([1.0])
    with torch.no_grad():
        p1 = filtered_probs(tgt(torch.tensor([prompt]))[:, -1], t, kk, p)[0]
        nxt = torch.tensor([prompt + [a] for a in range(8)])
        p2 = filtered_probs(tgt(nxt)[:, -1], t.expand(8), kk.expand(8), p.expand(8))
    expected_joint = (p1[:, None] * p2).flatten()
    spec = SpeculativeGenerator(Generator(tgt, eos_ids=[]), Generator(dft, eos_ids=[]), 2)
    n = 1500
    counts = torch.zeros(64)
    for seed in range(n):
        ids = spec.generate(prompt, SamplingParams(max_new_tokens=2, temperature=temperature, top_k=top_k,
                                                   seed=seed)).token_ids
        counts[ids[0] * 8 + ids[1]] += 1
    expected = expected_joint * n
    assert counts[expected == 0].sum() == 0  # nothing outside the target's support (top-k)
    keep = expected >= 5  # pool sparse cells
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    p_value = torch.special.gammaincc(torch.tensor(df / 2), chi2 / 2).item()
    assert p_value > 1e-3, (chi2.item(), df, p_value)


class FakeTok:
    bos_id, eos_id, eos_ids = 1, 2, frozenset({2})

    def __init__(self, shift=0):
        self.shift = shift

    def encode(self, text):
        return [ord(c) % 500 + self.shift for c in text]


def test_tokenizer_mismatch_is_rejected(target):
    draft = load_model("random:tiny-gqa", seed=1).model
    with pytest.raises(ParameterError, match="share a tokenizer"):
        SpeculativeGenerator(Generator(target, FakeTok()), Generator(draft, FakeTok(1)), 3)
    small = load_model("random:tiny-mha").model
    small.config = small.config.replace(vocab_size=256)
    with pytest.raises(ParameterError, match="vocabulary size 256"):
        SpeculativeGenerator(Generator(target, eos_ids=[]), Generator(small, eos_ids=[]), 3)


@pytest.mark.parametrize("k", [0, -1, 17, 2.5])
def test_k_bounds(target, k):
    with pytest.raises(ParameterError, match="speculate-k"):
        SpeculativeGenerator(Generator(target, eos_ids=[]), Generator(target, eos_ids=[]), k)


@pytest.mark.slow  # CI time (20 min on 2 cores): run with -m slow
def test_cli_speculative_greedy_equals_plain_on_default_model(smollm2_gguf):
    """`fmstack generate --draft-quantize int8` gives the plain greedy ids and reports acceptance."""
    import json
    import subprocess
    import sys

    prompt = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
    base = [sys.executable, "-m", "fmstack", "-q", "generate", "--model", str(smollm2_gguf),
            "--max-new-tokens", "20", "--json", prompt]
    runs = [subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
            for extra in ([], ["--draft-quantize", "int8", "--speculate-k", "3"])]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    plain, spec = (json.loads(p.stdout.strip().splitlines()[-1]) for p in runs)
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["speculate_k"] == 3 and 0.5 < spec["acceptance_rate"] <= 1 and 0 < spec["mean_accepted"] <= 3
    assert "acceptance_rate" not in plain


def test_cli_speculate_k_without_draft_is_an_error():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fmstack", "generate", "--model", "random:tiny-mha",
                           "--speculate-k", "4", "hi"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--speculate-k needs a draft" in proc.stderr and "Traceback" not in proc.stderr
