"""Property tests (hypothesis) of request parsing (fmstack/serve/protocol.py): whatever JSON a client
sends, parsing either returns a request whose values are in range or raises APIError 400 whose
body is OpenAI-shaped ASCII JSON; nothing else escapes."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmstack.serve.protocol import (MAX_INT, MIN_TOP_P, APIError, parse_chat, parse_completion, parse_json_body)

VOCAB = 512

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**80, max_value=2**80),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options", "n",
          "logprobs", "echo", "ignore_eos", "stop_token_ids", "user", "presence_penalty", "min_tokens",
          "frequency_penalty", "repetition_penalty", "min_p", "logit_bias"]
numbers = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True, allow_infinity=True))
prompts = st.one_of(st.text(min_size=1, max_size=10), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5))
bodies = st.fixed_dictionaries({"prompt": prompts},
                               optional={f: st.one_of(numbers, json_values) for f in FIELDS})


def check_error(e: APIError) -> None:
    assert e.status == 400
    text = json.dumps(e.body())
    assert text.isascii() and set(e.body()["error"]) == {"message", "type", "param", "code"}
    json.dumps(e.body(), ensure_ascii=False).encode("utf-8")  # encodable as UTF-8 too


def parsed_or_400(parse, *args):
    """parse(*args), or None after checking that the APIError it raised is a proper 400."""
    try:
        return parse(*args)
    except APIError as e:
        check_error(e)
        return None


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_completion_parsing_accepts_in_range_values_or_gives_400(body):
    req = parsed_or_400(parse_completion, body, VOCAB)
    if req is None:
        return
    s, c = req.common.sampling, req.common
    assert c.max_tokens is None or 0 <= c.max_tokens <= MAX_INT
    assert 0 <= s.get("temperature", 0) <= 2 and math.isfinite(s.get("temperature", 0))
    assert MIN_TOP_P <= s.get("top_p", 1) <= 1
    assert 0 <= s.get("top_k", 0) <= VOCAB
    assert 0 <= s.get("seed", 0) < 2**63
    assert req.logprobs is None or 0 <= req.logprobs <= 20
    assert all(0 <= t < VOCAB for t in c.stop_token_ids)
    assert 1 <= c.n and c.n * len(req.prompts) <= 64
    assert all(-2 <= s.get(f, 0) <= 2 for f in ("presence_penalty", "frequency_penalty"))
    assert 0 < s.get("repetition_penalty", 1) and 0 <= s.get("min_p", 0) <= 1 and s.get("min_tokens", 0) >= 0
    assert all(0 <= t < VOCAB and -100 <= b <= 100 for t, b in s.get("logit_bias", ()))
    for j in range(c.n):
        c.sampling_params(c.max_tokens or 1, j).check_vocab(VOCAB)  # SamplingParams accepts what parsing accepted


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({"messages": st.one_of(
    json_values, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                 "content": json_values}), max_size=3))},
    optional={f: st.one_of(numbers, json_values) for f in FIELDS[:9] + ["top_logprobs", "max_completion_tokens"]}))
def test_chat_parsing_gives_messages_or_400(body):
    req = parsed_or_400(parse_chat, body, VOCAB)
    if req is None:
        return
    assert req.messages and all(isinstance(m["content"], str) for m in req.messages)
    assert 0 <= req.top_logprobs <= 20


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode()),
                 st.text(max_size=20).map(lambda t: json.dumps({"prompt": t}).encode())))
def test_json_body_parsing_never_raises_anything_but_400(raw):
    body = parsed_or_400(parse_json_body, raw)
    if body is None:
        return
    assert isinstance(body, dict)
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # every string in it is text


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": ["a", "\\udc00x"]}', "prompt[1]"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    (b'{"x": {"y": ["\\udfff"]}}', "x.y[0]"),
])
def test_lone_surrogates_name_their_field(raw, param):
    with pytest.raises(APIError) as e:
        parse_json_body(raw)
    assert e.value.param == param
    check_error(e.value)


def test_huge_integers_are_400_not_500():
    with pytest.raises(APIError) as e:
        parse_json_body(b'{"prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}")
    check_error(e.value)
    body = {"prompt": "hi", "max_tokens": 4, "temperature": 1, "top_k": 18446744073709551616}
    with pytest.raises(APIError) as e:
        parse_completion(body, VOCAB)
    assert e.value.param == "top_k" and f"[-1, {VOCAB}]" in e.value.message
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        with pytest.raises(APIError) as e:
            parse_completion({"prompt": "hi", name: 10**400}, VOCAB)
        assert e.value.param == name


def test_logit_bias_and_n_bounds_name_the_field():
    ok = parse_completion({"prompt": "hi", "logit_bias": {"0": -100, "511": 100.0}, "n": 2, "seed": 2**63 - 1}, VOCAB)
    assert ok.common.sampling["logit_bias"] == ((0, -100.0), (511, 100.0))
    assert [ok.common.sampling_params(4, j).seed for j in range(2)] == [2**63 - 1, 0]  # seed + choice, folded
    for body, field in [({"logit_bias": {"512": 1}}, "logit_bias"), ({"logit_bias": {"07": 1}}, "logit_bias"),
                        ({"logit_bias": {"1": True}}, "logit_bias"), ({"logit_bias": {"1": -100.01}}, "logit_bias"),
                        ({"n": True}, "n"), ({"n": 65}, "n"), ({"prompt": ["a", "b"], "n": 33}, "n"),
                        ({"min_p": 1.01}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty")]:
        with pytest.raises(APIError) as e:
            parse_completion({"prompt": "hi", **body}, VOCAB)
        check_error(e.value)
        assert e.value.param == field, (body, e.value.message)
