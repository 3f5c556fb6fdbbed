"""HellaSwag-style packed scoring and sliding-window perplexity of every model family vs HF transformers.

Tiny random models of each family (`tests/models/test_families.py`: randomised norms and biases, Mistral
with a window of 6 tokens), saved with `save_pretrained` and loaded with `fmstack.loading.load_model`
together with SmolLM2's tokenizer. HellaSwag rows pack one context (longer than Mistral's window) with
four continuations in one sequence, so the window must be applied inside the packed mask on the
plain sequence's positions; each score is compared with HF's log-likelihood of the plain
`context + continuation`. Tolerance: 1e-4 absolute on summed fp32 log-likelihoods (observed ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

from fmstack.eval import hellaswag as hs
from fmstack.eval.perplexity import perplexity, windows
from fmstack.eval.scoring import packed_mask
from fmstack.loading import load_model
from tests.models.test_families import (FAMILIES, MOE_FAMILIES, WINDOW, hf_family_model, save_and_load,
                                        smollm2_tokenizer_dir)  # noqa: F401 (a fixture used below)

TOL = 1e-4
DOCS = [
    dict(ind=1, activity_label="Cooking", ctx_a="A man stands in a kitchen and cuts vegetables on a board.",
         ctx_b="then he", label=2, endings=["puts them in a pot.", "walks away.",
                                              "washes the knife and dries it with a towel before cooking.", "sings"]),
    dict(ind=2, activity_label="Home and Garden", ctx_a="[header] How to water a plant [title] Fill a can.",
         ctx_b="", label=0, endings=["[step] Pour slowly around the base of the stem.", "Sleep.",
                                     "Paint the wall a different colour.", "Call a friend on the phone now."]),
]
TEXT = ("The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the sea, the fishermen "
        "prepared their nets before dawn, talking quietly about the weather and the price of bread.")


@pytest.fixture(scope="module", params=[*FAMILIES, *MOE_FAMILIES])
def family(request, smollm2_tokenizer_dir, tmp_path_factory):  # noqa: F811
    """(family, HF model, fmstack `LoadedModel` from its save_pretrained directory)."""
    hf = hf_family_model(request.param, vocab_size=49152)
    path = tmp_path_factory.mktemp(request.param)
    save_and_load(hf, path, smollm2_tokenizer_dir)
    return request.param, hf, load_model(str(path))


@torch.no_grad()
def hf_logprob(hf, context: list[int], continuation: list[int]) -> float:
    whole = context + continuation
    logp = hf(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    rows = torch.arange(len(context) - 1, len(whole) - 1)
    return logp[rows, torch.tensor(continuation)].sum().item()


def test_hellaswag_packed_scores_match_hf(family):
    name, hf, loaded = family
    examples = [hs.to_example(d) for d in DOCS]
    requests = hs.build_requests(loaded.tokenizer, examples)
    if name == "mistral":  # the window must matter: contexts and packed rows are longer than it
        assert min(len(c) for c, _ in requests) > WINDOW
    result = hs.evaluate(loaded.model, loaded.tokenizer, DOCS, batch_size=2)
    ref = [hf_logprob(hf, c, k) for c, k in requests]
    got = [x for r in result.rows for x in r.loglik]
    assert max(abs(a - b) for a, b in zip(got, ref)) < TOL
    assert [r.pred for r in result.rows] == [hs._argmax(ref[i:i + 4]) for i in range(0, len(ref), 4)]


@pytest.mark.parametrize("max_length,stride", [(16, 16), (16, 7)])
def test_perplexity_matches_hf(family, max_length, stride):
    """Windows longer than Mistral's: scored tokens beyond it see only its last 6 positions."""
    _, hf, loaded = family
    ids = loaded.tokenizer.encode(TEXT)
    res = perplexity(loaded.model, loaded.tokenizer, TEXT, max_length=max_length, stride=stride, batch_size=3)
    ref = -sum(hf_logprob(hf, ids[b:s], ids[s:e]) for b, s, e in windows(len(ids), max_length, stride))
    assert res.n_tokens == sum(e - s for _, s, e in windows(len(ids), max_length, stride))
    assert res.nll == pytest.approx(ref, rel=1e-5, abs=TOL)


def test_packed_window_mask_counts_plain_positions():
    """Context of 4 (positions 0-3), continuations at positions 4-6 and 4-5, window 3: the second
    continuation's first token (position 4) sees context positions 2-3 and itself, not the first
    continuation (packed columns 4-6), and no row is fully masked."""
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, -1]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5, 6]])
    mask = packed_mask(segments, positions=positions, window=3)[0, 0]
    assert mask[7].nonzero().flatten().tolist() == [2, 3, 7]
    assert mask[6].nonzero().flatten().tolist() == [4, 5, 6]
    assert mask.any(-1).all()
    assert torch.equal(packed_mask(segments, positions=positions), packed_mask(segments))

