"""The sampler's logit processing against hand-computed references: presence/frequency penalties
(OpenAI: over generated tokens), repetition penalty (HF: over prompt + generated), logit_bias,
min_p, min_tokens; then the same through `Generator` and the serving engine, which share it."""

from __future__ import annotations

import math

import pytest
import torch

from fmstack.errors import ParameterError
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import (SamplingParams, adjust_logits, filtered_probs, logit_adjustments, sample_rows,
                                         sampling_tensors)
from fmstack.loading import load_model
from fmstack.serve.engine import Engine, EngineConfig, RequestParams

V = 8
LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0, -0.5]])


def adjusted(p: SamplingParams, tokens: list[int], prompt_len: int, stop=()) -> torch.Tensor:
    adj = logit_adjustments([p], [tokens], [prompt_len], [set(stop)], V, "cpu")
    return adjust_logits(LOGITS.clone(), *adj)[0]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = adjusted(p, [3, 3, 0, 3, 3, 6, 0], prompt_len=2)  # prompt [3, 3]; generated 0, 3, 3, 6, 0
    ref = LOGITS[0].tolist()
    for tok, count in {0: 2, 3: 2, 6: 1}.items():
        ref[tok] -= 0.5 + 0.25 * count
    assert got.tolist() == pytest.approx(ref)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_over_prompt_and_output():
    p = SamplingParams(repetition_penalty=2.0)
    got = adjusted(p, [0, 1, 3, 1], prompt_len=3)  # 0 (2.0), 1 (-1.0), 3 (3.0) seen
    ref = LOGITS[0].tolist()
    ref[0], ref[1], ref[3] = 1.0, -2.0, 1.5
    assert got.tolist() == pytest.approx(ref)


def test_logit_bias_is_added_and_can_force_a_token_even_for_greedy_rows():
    p = SamplingParams(logit_bias={"4": 10.0, 3: -1.5})
    ref = LOGITS[0].tolist()
    ref[4] += 10.0
    ref[3] -= 1.5
    assert adjusted(p, [1], prompt_len=1).tolist() == pytest.approx(ref)
    adj = logit_adjustments([p], [[1]], [1], [set()], V, "cpu")
    assert sample_rows(LOGITS, [p], [None], adj).tolist() == [4]


def test_greedy_row_with_a_penalty_applies_it_before_the_argmax():
    p = SamplingParams(frequency_penalty=2.0)  # token 3 (3.0) generated once: 1.0 < token 0's 2.0
    adj = logit_adjustments([p], [[5, 3]], [1], [set()], V, "cpu")
    assert sample_rows(LOGITS, [p], [None], adj).tolist() == [0]
    assert sample_rows(LOGITS, [SamplingParams()], [None]).tolist() == [3]


def test_rows_without_adjustments_cost_nothing_and_stay_unchanged():
    assert logit_adjustments([SamplingParams(), SamplingParams(temperature=1.0)], [[1], [2]], [1, 1],
                             [set(), set()], V, "cpu") == (None, None)
    scale, add = logit_adjustments([SamplingParams(), SamplingParams(logit_bias={1: 3.0})], [[1], [2]], [1, 1],
                                   [set(), set()], V, "cpu")
    assert scale is None  # no row has a repetition penalty
    out = adjust_logits(LOGITS.repeat(2, 1), scale, add)
    assert torch.equal(out[0], LOGITS[0]) and out[1, 1] == 2.0


def test_min_tokens_masks_stop_tokens_until_reached():
    p = SamplingParams(min_tokens=2)
    assert adjusted(p, [9 % V, 3], prompt_len=1, stop={3, 6})[[3, 6]].tolist() == [-math.inf] * 2  # 1 generated
    assert torch.equal(adjusted(p, [1, 3, 2], prompt_len=1, stop={3, 6}), LOGITS[0])  # 2 generated: free


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability():
    probs = LOGITS[0].softmax(-1)
    for min_p in (0.05, 0.3, 1.0):
        keep = probs >= min_p * probs.max()
        ref = torch.where(keep, probs, 0.0)
        ref = ref / ref.sum()
        t, k, tp = sampling_tensors([SamplingParams(temperature=1.0)], "cpu")
        got = filtered_probs(LOGITS, t, k, tp, torch.tensor([min_p]))[0]
        assert torch.allclose(got, ref, atol=1e-6), (min_p, got, ref)
    t, k, tp = sampling_tensors([SamplingParams(temperature=0.5)], "cpu")  # after temperature
    scaled = (LOGITS[0] / 0.5).softmax(-1)
    got = filtered_probs(LOGITS, t, k, tp, torch.tensor([0.1]))[0]
    assert torch.equal(got > 0, scaled >= 0.1 * scaled.max())


@pytest.mark.parametrize("kwargs,field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": True}, "min_tokens"),
    ({"logit_bias": {1: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": ((1, 1.0), (1, 2.0))}, "logit_bias"), ({"logit_bias": 5}, "logit_bias"),
])
def test_new_fields_are_validated_by_name(kwargs, field):
    with pytest.raises(ParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)


# -- through Generator and the engine (a tiny random model; logit_bias +100 dominates its logits) ----
@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-gqa").model


EOS = 7


def test_generator_min_tokens_suppresses_eos_and_ignore_eos_runs_to_length(tiny):
    gen = Generator(tiny, eos_ids=[EOS])
    force = {EOS: 100.0}
    out = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, logit_bias=force, min_tokens=4))[0]
    assert len(out.token_ids) == 5 and EOS not in out.token_ids[:4] and out.token_ids[4] == EOS
    assert out.finish_reason == "stop"
    out = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=6, logit_bias=force, ignore_eos=True))[0]
    assert out.token_ids == [EOS] * 6 and out.finish_reason == "length"
    with pytest.raises(ParameterError, match="logit_bias"):
        gen.generate([[1]], SamplingParams(logit_bias={tiny.config.vocab_size: 1.0}))


def engine_tokens(model, prompt, params: RequestParams) -> tuple[list[int], str]:
    eng = Engine(model, None, EngineConfig(block_size=4, num_blocks=80, max_num_batched_tokens=32))
    outs = []
    eng.add_request("r", prompt, params, outs.append)
    while eng.has_work():
        eng.step()
    return [t for o in outs for t in o.token_ids], outs[-1].finish_reason


def test_engine_and_generator_apply_the_same_penalties(tiny):
    prompt = [5, 9, 5, 11, 3, 5]
    sp = SamplingParams(max_new_tokens=12, repetition_penalty=1.8, presence_penalty=1.0, frequency_penalty=0.7)
    ref = Generator(tiny, eos_ids=[]).generate([prompt], sp)[0].token_ids
    plain = Generator(tiny, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=12))[0].token_ids
    assert ref != plain  # the penalties changed the greedy path
    assert engine_tokens(tiny, prompt, RequestParams(sp))[0] == ref


def test_engine_stop_token_ids_stop_and_min_tokens_holds_them_back(tiny):
    force = {40: 100.0}
    toks, reason = engine_tokens(tiny, [1, 2, 3], RequestParams(SamplingParams(max_new_tokens=8, logit_bias=force),
                                                                stop_token_ids=(40,)))
    assert toks == [40] and reason == "stop"
    toks, reason = engine_tokens(tiny, [1, 2, 3], RequestParams(
        SamplingParams(max_new_tokens=8, logit_bias=force, min_tokens=3), stop_token_ids=(40,)))
    assert len(toks) == 4 and 40 not in toks[:3] and toks[3] == 40 and reason == "stop"


def test_engine_choices_wait_for_the_first_prefill_and_share_its_blocks(tiny):
    """n copies of a prompt added with `after`: they reuse the first one's prompt blocks (prefix hits)
    and, greedy, give the same tokens; seeded sampling with different seeds differs."""
    eng = Engine(tiny, None, EngineConfig(block_size=4, num_blocks=80, max_num_batched_tokens=64))
    prompt = list(range(3, 23))  # 5 full blocks
    outs: dict[str, list[int]] = {}

    def cb(o):
        outs.setdefault(o.request_id, []).extend(o.token_ids)

    for j in range(3):
        eng.add_request(f"c{j}", prompt, RequestParams(SamplingParams(max_new_tokens=5)), cb,
                        after="c0" if j else None)
    assert len(eng.scheduler.waiting) == 1  # the copies wait for the first prefill
    while eng.has_work():
        eng.step()
    assert outs["c0"] == outs["c1"] == outs["c2"] and len(outs["c0"]) == 5
    assert eng.stats().prefix_cache_hit_tokens == 2 * 16  # 4 of 5 blocks each (the last is recomputed)
    assert eng.stats().blocks_used == 0


def test_speculative_decoding_refuses_logit_processing_it_cannot_apply(tiny):
    from fmstack.generation.speculative import SpeculativeGenerator

    spec = SpeculativeGenerator(Generator(tiny, eos_ids=[]), Generator(tiny, eos_ids=[]), 2)
    for kwargs in ({"presence_penalty": 1.0}, {"logit_bias": {1: 5.0}}, {"min_tokens": 2}, {"min_p": 0.1}):
        with pytest.raises(ParameterError, match="speculative decoding does not support"):
            spec.generate([1, 2, 3], SamplingParams(max_new_tokens=4, **kwargs))
