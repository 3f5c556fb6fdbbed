"""Graceful shutdown of a real `fmstack serve` process: SIGTERM mid-stream lets a short stream finish,
ends the streams that cannot finish within --shutdown-grace with an SSE error event and [DONE],
refuses new connections, and exits 0 after shutting the engine down. The server sizes its own KV
cache (no --kv-cache-mb) and logs one access line per request."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx


def read_stream(url: str, body: dict, events: list, connected: threading.Event, first: threading.Event) -> None:
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            connected.set()  # the headers came: the request is in the server
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    first.set()
    except httpx.HTTPError as e:
        events.append(f"transport error: {e!r}")
    connected.set()
    first.set()


def test_sigterm_drains_streams_then_exits_0(tiny_ckpt, tmp_path):
    from tests.serve.conftest import ServerProcess

    s = ServerProcess(["--model", str(tiny_ckpt), "--served-model-name", "tiny", "--max-num-seqs", "1",
                       "--max-model-len", "512", "--block-size", "8", "--shutdown-grace", "2", "--threads", "1"],
                      tmp_path / "server.log")
    try:
        short, long_ = [], [[] for _ in range(4)]
        connected = [threading.Event() for _ in range(5)]
        started = threading.Event()
        threads = [threading.Thread(target=read_stream, args=(
            s.url, {"prompt": "Hello", "max_tokens": 40, "stream": True, "ignore_eos": True}, short, connected[0],
            started))]
        # with one seat, four 480-token streams queue behind each other: far more than 2 s of work
        threads += [threading.Thread(target=read_stream, args=(
            s.url, {"prompt": f"Story {i}", "max_tokens": 480, "stream": True, "ignore_eos": True}, ev,
            connected[i + 1], threading.Event())) for i, ev in enumerate(long_)]
        threads[0].start()
        assert started.wait(60)
        for t in threads[1:]:
            t.start()
        assert all(c.wait(30) for c in connected)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # no new connections while draining
            refused = httpx.post(s.url + "/v1/completions", json={"prompt": "late", "max_tokens": 1}, timeout=5)
            assert refused.status_code == 503
        except httpx.ConnectError:
            pass
        assert s.proc.wait(30) == 0, s.log()
        for t in threads:
            t.join(30)
    finally:
        s.stop()
    log = s.log_path.read_text()
    assert short[-1] == "data: [DONE]"
    assert json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    ended = 0
    for ev in long_:
        assert ev[-1] == "data: [DONE]", ev[-3:]
        payload = json.loads(ev[-2][6:])
        if "error" in payload:
            ended += 1
            assert payload["error"]["code"] == "shutting_down"
    assert ended >= 1
    assert "KV cache:" in log and "set --kv-cache-mb to override" in log
    assert "POST /v1/completions 200 prompt_tokens=" in log and "server stopped" in log
