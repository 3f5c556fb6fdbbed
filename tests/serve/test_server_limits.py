"""API key (401) and a full queue (429) on a server with one seat and one queue slot."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def small_server(tiny_ckpt, tmp_path_factory):
    from tests.serve.conftest import ServerProcess

    s = ServerProcess(["--model", str(tiny_ckpt), "--served-model-name", "tiny", "--api-key", "s3cret",
                       "--max-num-seqs", "1", "--max-queue", "1", "--max-model-len", "512", "--kv-cache-mb", "8"],
                      tmp_path_factory.mktemp("log") / "server.log", api_key="s3cret")
    yield s
    s.stop()


def test_api_key_required(small_server):
    url = small_server.url
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        small_server.client(api_key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=1)
    assert small_server.client(api_key="s3cret").completions.create(model="tiny", prompt="hi", max_tokens=1)
    assert httpx.get(url + "/health").status_code == 200  # health stays open; the rest needs the key
    for path in ("/metrics", "/tokenizer_info", "/v1/models"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
    r = httpx.post(url + "/tokenize", json={"prompt": "hi"})
    assert r.status_code == 401


def test_queue_full_is_429(small_server):
    c = small_server.client(api_key="s3cret")
    started = threading.Event()
    results = []

    def long_stream():
        stream = c.completions.create(model="tiny", prompt="go", max_tokens=400, stream=True,
                                      extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 1:
                started.set()
        results.append("done")

    t1 = threading.Thread(target=long_stream)
    t1.start()
    assert started.wait(60)
    # one running; the next waits (queue slot 1 of 1); the one after is refused
    waiting = threading.Thread(target=lambda: results.append(
        c.completions.create(model="tiny", prompt="wait", max_tokens=2).choices[0].finish_reason))
    waiting.start()
    deadline = time.monotonic() + 30
    while small_server.metrics()["fmstack_num_requests_waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model="tiny", prompt="refused", max_tokens=2)
    assert "queue is full" in str(e.value)
    t1.join(120)
    waiting.join(120)
    assert sorted(results) == ["done", "length"]
