"""The sampling surface over HTTP with the official `openai` client: n choices (plain and streamed,
completions and chat), logit_bias forcing a token, ignore_eos/min_tokens/stop_token_ids via
`extra_body`, and out-of-range values answered 400 naming the field (never 500)."""

from __future__ import annotations

import openai
import pytest

FORCED = 42  # a token id forced with logit_bias +100 (the random model's logits are far smaller)


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    from fmstack.tokenizer import load_tokenizer

    return load_tokenizer(tiny_ckpt)


def test_n_choices_plain_completions(server):
    c = server.client()
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=3, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) > 1  # each choice has its own seed offset
    again = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=3, n=3)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]  # seeded: reproducible
    assert r.usage.completion_tokens == 24
    greedy = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    two = c.completions.create(model="tiny", prompt=["a b", "c d e"], max_tokens=3, n=2)
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text and two.usage.completion_tokens == 12


def test_n_choices_streamed_carry_their_index(server):
    c = server.client()
    texts, finished = {}, set()
    for chunk in c.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, n=3, stream=True):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finished.add(ch.index)
    plain = c.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    assert finished == {0, 1, 2} and texts == {i: plain.choices[0].text for i in range(3)}


def test_n_choices_chat_plain_and_streamed(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Say something"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0.9, seed=1, n=2)
    assert [ch.index for ch in r.choices] == [0, 1] and all(ch.message.role == "assistant" for ch in r.choices)
    texts, finished = {0: "", 1: ""}, set()
    for chunk in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0.9, seed=1, n=2,
                                           stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and texts == {ch.index: ch.message.content for ch in r.choices}


def test_logit_bias_forces_a_token_and_ignore_eos_min_tokens_stop_token_ids(server, tok):
    c = server.client()
    piece = tok.decode([FORCED])
    r = c.completions.create(model="tiny", prompt="x", max_tokens=4, logit_bias={str(FORCED): 100})
    assert r.choices[0].text == piece * 4 and r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                  logit_bias={str(FORCED): 100})
    assert r.choices[0].message.content == piece * 3
    eos = sorted(tok.eos_ids)[0]
    r = c.completions.create(model="tiny", prompt="x", max_tokens=5, logit_bias={str(eos): 100},
                             extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = c.completions.create(model="tiny", prompt="x", max_tokens=9, logit_bias={str(eos): 100},
                             extra_body={"min_tokens": 3})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4
    r = c.completions.create(model="tiny", prompt="x", max_tokens=9, logit_bias={str(FORCED): 100},
                             extra_body={"stop_token_ids": [FORCED]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def test_penalties_and_min_p_are_accepted(server):
    c = server.client()
    r = c.completions.create(model="tiny", prompt="the the the", max_tokens=6, temperature=0.8, seed=5,
                             presence_penalty=1.5, frequency_penalty=-0.5,
                             extra_body={"repetition_penalty": 1.3, "min_p": 0.1})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6


BAD = [
    ({"n": 0}, "n"), ({"n": 65}, "n"), ({"presence_penalty": 2.1}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"logit_bias": {"49152": 5}}, "logit_bias"),
    ({"logit_bias": {"12": 100.5}}, "logit_bias"), ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"extra_body": {"repetition_penalty": -1}}, "repetition_penalty"), ({"extra_body": {"min_p": -0.1}}, "min_p"),
    ({"extra_body": {"min_tokens": 1.5}}, "min_tokens"), ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
    ({"extra_body": {"stop_token_ids": [49152]}}, "stop_token_ids"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f for _, f in BAD])
def test_invalid_values_are_400_naming_the_field(server, kwargs, field):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hi", max_tokens=2, **kwargs)
    assert e.value.body["param"] == field and field in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, **kwargs)
    assert e.value.body["param"] == field
