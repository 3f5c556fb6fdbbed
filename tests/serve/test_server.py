"""`fmstack serve` as a real process on 127.0.0.1, driven by the official `openai` client (and raw
httpx where a client would refuse to send the request): completions, chat, streaming, echo /
logprobs, concurrency, disconnects, hostile input."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

PROMPTS = [f"Request {i}: the quick brown fox number {i} jumps over" + " lazy dog" * (i % 5) for i in range(16)]


def wait_for(cond, timeout=30.0, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


def test_health_models_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    m = server.metrics()
    for name in ("fmstack_num_requests_running", "fmstack_num_requests_waiting", "fmstack_kv_blocks_used",
                 "fmstack_kv_blocks_free", "fmstack_generation_tokens_total"):
        assert name in m


def test_completion_text_and_token_ids_agree(server, tiny_ckpt):
    from fmstack.tokenizer import load_tokenizer

    c = server.client()
    r = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12, temperature=0)
    ids = load_tokenizer(tiny_ckpt).encode("The capital of France is")
    r2 = c.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == r2.choices[0].text and r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    batch = c.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=4)
    assert [ch.index for ch in batch.choices] == [0, 1]
    assert r.choices[0].text.startswith(batch.choices[0].text)


def test_echo_logprobs_score_the_prompt(server, tiny_ckpt):
    """echo + max_tokens=0 + logprobs returns the prompt's token logprobs (lm-eval loglikelihood)."""
    from fmstack.loading import load_model

    loaded = load_model(str(tiny_ckpt))
    ids = loaded.tokenizer.encode("A man is sitting on a roof. He starts pulling up roofing")
    r = server.client().completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) == len(lp.tokens)
    with torch.no_grad():
        ref = loaded.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(max(top.values()) == pytest.approx(ref[i].max().item(), abs=1e-4)
               for i, top in enumerate(lp.top_logprobs[1:]))
    assert r.choices[0].text == loaded.tokenizer.decode(ids) and r.usage.completion_tokens == 0
    # max_tokens=1 (what lm-eval sends): the same prompt part plus one generated token
    r1 = server.client().completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1)
    assert r1.choices[0].logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert len(r1.choices[0].logprobs.tokens) == len(ids) + 1


def test_stream_matches_non_stream_and_ends_with_done(server):
    c = server.client()
    full = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10)
    chunks = list(c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    assert "usage" not in json.loads(lines[-2][6:])  # include_usage not asked for


def test_chat_and_chat_stream(server):
    c = server.client()
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, logprobs=True, top_logprobs=2)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_stop_strings_and_seeded_sampling(server):
    c = server.client()
    full = c.completions.create(model="tiny", prompt="Hello", max_tokens=12).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip()
    cut = c.completions.create(model="tiny", prompt="Hello", max_tokens=12, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    kw = dict(model="tiny", prompt="Hello", max_tokens=12, temperature=1.0, top_p=0.9)
    a = c.completions.create(seed=7, **kw).choices[0].text
    b = c.completions.create(seed=7, **kw).choices[0].text
    d = c.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != d


def test_16_concurrent_streaming_clients_get_their_solo_output(server):
    c = server.client()
    solo = [c.completions.create(model="tiny", prompt=p, max_tokens=24).choices[0].text for p in PROMPTS]
    steps0 = server.metrics()["fmstack_engine_steps_total"]
    barrier = threading.Barrier(len(PROMPTS))

    def stream(p):
        barrier.wait()
        return "".join(ch.choices[0].text for ch in
                       c.completions.create(model="tiny", prompt=p, max_tokens=24, stream=True) if ch.choices)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(stream, PROMPTS))
    assert got == solo
    steps = server.metrics()["fmstack_engine_steps_total"] - steps0
    assert steps < len(PROMPTS) * 24 / 2  # they really ran batched (solo would take 16 x 24 steps)


def test_disconnecting_clients_leave_no_used_blocks(server):
    def one_stream():
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "Tell me a very long story", "max_tokens": 200,
                                "stream": True}) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 3:
                    break  # leaving the block closes the connection mid-stream

    threads = [threading.Thread(target=one_stream) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # a non-streaming client that gives up (read timeout) is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        # (the full answer takes ~0.6 s on this tiny model; the client leaves after 0.1 s and the
        # server notices within POLL_S = 0.05 s)
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.1),
                   json={"model": "tiny", "prompt": "Another long one", "max_tokens": 250, "ignore_eos": True,
                         "logprobs": 5})
    assert wait_for(lambda: server.metrics()["fmstack_kv_blocks_used"] == 0
                    and server.metrics()["fmstack_num_requests_running"] == 0), server.metrics()
    text = httpx.get(server.url + "/metrics").text
    aborted = [ln for ln in text.splitlines() if 'finish_reason="abort"' in ln]
    assert aborted and float(aborted[0].rsplit(" ", 1)[1]) >= 7


HOSTILE = [
    # (description, body (dict -> JSON, bytes -> raw), expected status, text the message must contain)
    ("bad json", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("json array body", b"[1, 2, 3]", 400, "JSON object"),
    ("empty body", b"", 400, "empty"),
    ("not utf8", b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("prompt wrong type", {"model": "tiny", "prompt": 42}, 400, "prompt"),
    ("prompt mixed list", {"model": "tiny", "prompt": ["a", 1]}, 400, "prompt"),
    ("empty prompt", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("empty token list", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("token id out of range", {"model": "tiny", "prompt": [1, 10**9]}, 400, "token id"),
    ("negative token id", {"model": "tiny", "prompt": [-5]}, 400, "token id"),
    ("max_tokens string", {"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens negative", {"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens huge", {"model": "tiny", "prompt": "hi", "max_tokens": 10**12}, 400, "maximum context length is 256"),
    ("max_tokens float", {"model": "tiny", "prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens bool", {"model": "tiny", "prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("over-length prompt", {"model": "tiny", "prompt": "word " * 400, "max_tokens": 1}, 400,
     "maximum context length is 256"),
    ("temperature negative", {"model": "tiny", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("temperature nan", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("top_p zero", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top_k negative", {"model": "tiny", "prompt": "hi", "top_k": -3}, 400, "top_k"),
    ("logprobs too many", {"model": "tiny", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("stop wrong type", {"model": "tiny", "prompt": "hi", "stop": [1, 2]}, 400, "stop"),
    ("stop empty string", {"model": "tiny", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("n zero", {"model": "tiny", "prompt": "hi", "n": 0}, 400, "n"),
    ("n x prompts over the limit", {"model": "tiny", "prompt": ["a", "b", "c"], "n": 30}, 400, "at most 64 choices"),
    ("seed string", {"model": "tiny", "prompt": "hi", "seed": "abc"}, 400, "seed"),
    ("stream not bool", {"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", {"model": "tiny", "prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("unknown field", {"model": "tiny", "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("presence_penalty out of range", {"model": "tiny", "prompt": "hi", "presence_penalty": 2.5}, 400,
     "presence_penalty"),
    ("frequency_penalty out of range", {"prompt": "hi", "frequency_penalty": -2.01}, 400, "frequency_penalty"),
    ("repetition_penalty zero", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("min_p over one", {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    ("min_tokens negative", {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ("logit_bias not an object", {"prompt": "hi", "logit_bias": [1, 2]}, 400, "logit_bias"),
    ("logit_bias key not an id", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias id past vocab", {"prompt": "hi", "logit_bias": {"49152": 1}}, 400, "logit_bias"),
    ("logit_bias out of range", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("logit_bias too many", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "at most 300"),
    ("unknown model", {"model": "gpt-9", "prompt": "hi"}, 404, "gpt-9"),
    ("model wrong type", {"model": ["tiny"], "prompt": "hi"}, 400, "model"),
    ("oversized body", {"model": "tiny", "prompt": "x" * 100_000}, 413, "limit"),
    ("deeply nested json", b'{"prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "nested too deeply"),
    ("too many prompts", {"model": "tiny", "prompt": [[1]] * 65}, 400, "at most 64"),
    ("echo not bool", {"model": "tiny", "prompt": "hi", "echo": 1}, 400, "echo"),
    # bounds where parsed: every numeric field, named in the message
    ("top_k past 64 bits", {"prompt": "hi", "max_tokens": 4, "temperature": 1, "top_k": 18446744073709551616},
     400, "top_k"),
    ("top_k over vocab", {"prompt": "hi", "top_k": 49153}, 400, "top_k"),
    ("top_p below float32", {"prompt": "hi", "temperature": 1, "top_p": 1e-50}, 400, "top_p"),
    ("temperature huge int", {"prompt": "hi", "temperature": 10**400}, 400, "temperature"),
    ("temperature overflows float", b'{"prompt": "hi", "temperature": 1e999}', 400, "temperature"),
    ("seed past 64 bits", {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("seed below 64 bits", {"prompt": "hi", "seed": -2**63 - 1}, 400, "seed"),
    ("max_tokens past 64 bits", {"prompt": "hi", "max_tokens": 2**63}, 400, "max_tokens"),
    ("5000-digit integer", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    ("logprobs huge", {"prompt": "hi", "logprobs": 10**30}, 400, "logprobs"),
    ("n huge", {"prompt": "hi", "n": 10**30}, 400, "n"),
    ("penalty huge int", {"prompt": "hi", "presence_penalty": 10**400}, 400, "presence_penalty"),
    # lone surrogates: valid JSON, not text
    ("surrogate prompt", b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("surrogate prompt list", b'{"prompt": ["ok", "\\udfff"]}', 400, "prompt[1]"),
    ("surrogate stop", b'{"prompt": "hi", "stop": ["\\ud800"]}', 400, "stop[0]"),
    ("surrogate model", b'{"prompt": "hi", "model": "\\ud800"}', 400, "model"),
    ("surrogate key", b'{"prompt": "hi", "\\ud800": 1}', 400, "lone surrogate"),
]

CHAT_HOSTILE = [
    ("no messages", {"model": "tiny"}, 400, "messages"),
    ("messages not list", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("bad role", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("content wrong type", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("image part", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "text parts"),
    ("top_logprobs without logprobs", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                        "top_logprobs": 2}, 400, "top_logprobs"),
    ("surrogate content", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages[0].content"),
    ("surrogate text part", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     400, "messages[0].content[0].text"),
    ("top_logprobs huge", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                           "top_logprobs": 2**70}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("route,cases", [("/v1/completions", HOSTILE), ("/v1/chat/completions", CHAT_HOSTILE)])
def test_hostile_requests_get_clear_errors_and_server_keeps_serving(server, route, cases):
    failures = []
    for desc, body, status, needle in cases:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = httpx.post(server.url + route, timeout=30, **kw)
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if (r.status_code != status or needle not in (err.get("message") or "") or not err.get("type")
                or set(err) != {"message", "type", "param", "code"} or not r.content.isascii()):
            failures.append((desc, r.status_code, r.text[:300]))
    assert not failures, failures
    assert server.alive()
    assert server.client().completions.create(model="tiny", prompt="still there?", max_tokens=2).choices[0].text


def test_openai_client_sees_typed_errors(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hi " * 300, max_tokens=10)
    assert "maximum context length is 256" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
