"""Hardening of the HTTP layer: text offsets over split UTF-8 characters, keep-alive after bad input,
tokenizer routes refusing non-text, the one-line 500, the API key on every route, CPU work off the
event loop, the loopback check and the KV-cache sizing. In process (FastAPI's TestClient over a
random model) where no real server is needed; against the session `server` otherwise."""

from __future__ import annotations

import logging
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from fmstack.serve.engine import RequestOutput, TokenLogprob


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf):
    from fmstack.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def tiny_engine():
    from fmstack.loading import load_model
    from fmstack.serve.engine import Engine, EngineConfig

    loaded = load_model("random:tiny-gqa")
    return Engine(loaded.model, None, EngineConfig(kv_cache_bytes=1 << 22, max_model_len=256, block_size=8))


def split_char_ids(tok) -> list[int]:
    """'a', the two byte-level tokens of 'é' (0xC3, 0xA9: each half a character), 'b'."""
    return [tok.token_to_id("a"), tok.token_to_id("Ã"), tok.token_to_id("©"), tok.token_to_id("b")]


def test_text_offset_of_half_characters_indexes_the_text(smollm2_tok):
    from fmstack.serve.http.responses import CompletionChoice, TokenText

    ids = split_char_ids(smollm2_tok)
    assert [smollm2_tok.token_bytes(t) for t in ids] == [b"a", b"\xc3", b"\xa9", b"b"]
    plps = [None] + [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids[1:]]
    out = RequestOutput("r-0", [], "", None, plps, True, "length", len(ids), 0)
    acc = CompletionChoice(0, TokenText(smollm2_tok), 0, smollm2_tok.decode(ids), ids)
    delta = acc.add(out)
    choice = acc.choice()
    assert choice["text"] == delta["text"] == "aéb"
    # the token completing 'é' points at 'é'; 'b' at 'b' (counting decoded pieces gave 3, past the end)
    assert choice["logprobs"]["text_offset"] == [0, 1, 1, 2]
    assert all(choice["text"][o] for o in choice["logprobs"]["text_offset"])


def test_text_offset_through_the_server(server, smollm2_tok):
    ids = split_char_ids(smollm2_tok)
    r = server.client().completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True, logprobs=0)
    text, offsets = r.choices[0].text, r.choices[0].logprobs.text_offset
    assert text.startswith("aéb") and offsets[:4] == [0, 1, 1, 2]
    assert offsets == sorted(offsets) and all(0 <= o < len(text) for o in offsets)
    chunks = list(server.client().completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True, logprobs=0,
                                                     stream=True))
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == offsets


def test_bad_input_keeps_the_keep_alive_connection(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for body in (b'{"prompt": "\\ud800"}', b'{"prompt": "hi", "top_k": 18446744073709551616}',
                     b'{"prompt": ' + b"1" * 5000 + b"}"):
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.headers.get("connection") != "close"
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 1})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("route,body,param", [
    ("/tokenize", b'{"prompt": "x\\ud800"}', "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    ("/detokenize", b'{"tokens": [1], "x": "\\ud800"}', "x"),
])
def test_tokenizer_routes_refuse_lone_surrogates(server, route, body, param):
    r = httpx.post(server.url + route, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and r.content.isascii()


def test_a_bug_is_one_log_line_and_a_closed_connection(tiny_engine, caplog):
    from fmstack.serve.api import ServerState, build_app

    class Broken:
        max_model_len, error = 256, None

        def stats(self):
            raise RuntimeError("boom \ud800")

    client = TestClient(build_app(ServerState(Broken(), None, "m")))
    with caplog.at_level(logging.INFO, logger="fmstack.serve.api"):
        r = client.get("/metrics")
    assert r.status_code == 500 and r.headers["connection"] == "close" and r.content.isascii()
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    rid = r.headers["x-request-id"]
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and rid in errors[0].getMessage() and "RuntimeError" in errors[0].getMessage()
    assert errors[0].exc_info is None and "\n" not in errors[0].getMessage()
    access = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO]
    assert any(m.startswith("GET /metrics 500") and rid in m for m in access)
    assert client.get("/health").json() == {"status": "ok"}  # the server keeps serving


def test_api_key_guards_every_route_but_health(tiny_engine, smollm2_tok):
    from fmstack.serve.api import ServerState, build_app

    for no_auth in (False, True):
        c = TestClient(build_app(ServerState(tiny_engine, smollm2_tok, "m", api_key="k", metrics_no_auth=no_auth)))
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == (200 if no_auth else 401)
        for method, path in [("GET", "/tokenizer_info"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                             ("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/nope")]:
            r = c.request(method, path, json={"prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        ok = {"Authorization": "Bearer k"}
        assert c.get("/metrics", headers=ok).status_code == 200
        assert c.post("/tokenize", json={"prompt": "hi"}, headers=ok).json()["count"] >= 1


def test_tokenizing_and_templates_run_off_the_event_loop(tiny_engine, smollm2_tok):
    """encode / apply_chat_template / logprob detokenization run on the worker pool's threads."""
    from fmstack.serve.api import ServerState, build_app

    seen: list[str] = []

    class Spy:
        def __getattr__(self, name):
            return getattr(smollm2_tok, name)

        def encode(self, *a, **kw):
            seen.append(threading.current_thread().name)
            return smollm2_tok.encode(*a, **kw)[:4]

        def apply_chat_template(self, *a, **kw):
            seen.append(threading.current_thread().name)
            return smollm2_tok.apply_chat_template(*a, **kw)

    c = TestClient(build_app(ServerState(tiny_engine, Spy(), "m")))
    assert c.post("/tokenize", json={"prompt": "hello"}).status_code == 200
    assert c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert len(seen) == 3 and all(name.startswith("fmstack-http") for name in seen), seen


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("10.0.0.1", False),
                                           ("::", False)])
def test_loopback_hosts(host, loopback):
    from fmstack.commands.serve import is_loopback

    assert is_loopback(host) is loopback


def test_kv_cache_sized_from_the_model_and_memory():
    from fmstack.serve.server import kv_cache_budget

    per_block = 4096
    # enough for 32 sequences of 512 tokens (32 blocks of 16 each) when memory allows
    assert kv_cache_budget(per_block, 16, 32, 512, available=1 << 40) == 32 * 32 * per_block
    # capped at a quarter of the available memory...
    assert kv_cache_budget(per_block, 16, 32, 512, available=400 * per_block) == 100 * per_block
    # ...but never below one full-length sequence
    assert kv_cache_budget(per_block, 16, 32, 512, available=4 * per_block) == 32 * per_block
