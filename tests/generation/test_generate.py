"""Generation loop on tiny random models: greedy == plain argmax loop, batched == single,
seeded sampling reproducible, parameter validation."""

import pytest
import torch

from fmstack.errors import ParameterError
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import SamplingParams, sample
from fmstack.commands.generate import cli_finish_reason
from fmstack.loading import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-gqa", seed=0).model


def argmax_loop(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_plain_argmax_loop(tiny):
    prompt = [5, 17, 300, 42, 7]
    out = Generator(tiny, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert out.token_ids == argmax_loop(tiny, prompt, 12)
    assert out.finish_reason == "length"


def test_batched_equals_single(tiny):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [400, 3], [11, 12, 13, 14, 15]]
    gen = Generator(tiny, eos_ids=[])
    params = [SamplingParams(max_new_tokens=n) for n in (10, 6, 8)]
    batched = gen.generate(prompts, params)
    for p, sp, res in zip(prompts, params, batched):
        assert res.token_ids == gen.generate([p], sp)[0].token_ids
        assert len(res.token_ids) == sp.max_new_tokens


def test_eos_stops_row(tiny):
    prompt = [5, 17, 300]
    free = Generator(tiny, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=8))[0].token_ids
    eos = free[3]
    out = Generator(tiny, eos_ids=[eos]).generate([prompt], SamplingParams(max_new_tokens=8))[0]
    assert out.token_ids == free[:free.index(eos) + 1] and out.finish_reason == "stop" and out.stop_reason == eos
    assert cli_finish_reason(out) == "eos"  # what `fmstack generate --json` prints


def test_seeded_sampling_is_reproducible_and_varies(tiny):
    gen = Generator(tiny, eos_ids=[])
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    a = gen.generate([[1, 2, 3]], p)[0].token_ids
    assert a == gen.generate([[1, 2, 3]], p)[0].token_ids
    other = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16, temperature=1.0, seed=7))[0].token_ids
    assert a != other


def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(4000, 1)
    noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(0))
    ones = torch.ones(4000)
    ids = sample(logits, ones, torch.full((4000,), 2), ones, noise)
    assert set(ids.tolist()) == {3, 4}
    probs = torch.softmax(logits[0], -1)  # top-p 0.7: 4 (0.64) alone is short of 0.7, so {3, 4}
    ids = sample(logits, ones, torch.zeros(4000, dtype=torch.long), torch.full((4000,), 0.7), noise)
    assert set(ids.tolist()) == {3, 4}
    freq4 = (ids == 4).float().mean().item()
    expected4 = (probs[4] / (probs[3] + probs[4])).item()
    assert abs(freq4 - expected4) < 0.03
    greedy = sample(logits, torch.zeros(4000), torch.zeros(4000, dtype=torch.long), ones, noise)
    assert (greedy == 4).all()


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -3}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"seed": "x"}, "seed"), ({"stop": [""]}, "stop"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ParameterError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected(tiny):
    gen = Generator(tiny, eos_ids=[])
    with pytest.raises(ParameterError, match="empty"):
        gen.generate([[]], SamplingParams())
    with pytest.raises(ParameterError, match="outside"):
        gen.generate([[10**6]], SamplingParams())
    with pytest.raises(ParameterError, match="context length"):
        gen.generate([[1] * 200], SamplingParams(max_new_tokens=100))

