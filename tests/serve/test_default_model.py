"""`fmstack serve` on the real default model (SmolLM2-135M-Instruct) answers the openai client."""

from __future__ import annotations

import pytest

from fmstack.checkpoints.named import DEFAULT_MODEL


@pytest.fixture(scope="module")
def real_server(smollm2_gguf, tmp_path_factory):
    from tests.serve.conftest import ServerProcess

    s = ServerProcess(["--max-model-len", "512", "--kv-cache-mb", "64"], tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


def test_default_model_answers_openai_client(real_server):
    c = real_server.client()
    assert [m.id for m in c.models.list().data] == [DEFAULT_MODEL]
    r = c.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                  max_tokens=8)
    assert r.choices[0].message.content.strip() and r.usage.completion_tokens <= 8
    r = c.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=4)
    assert "Paris" in r.choices[0].text


@pytest.mark.slow
def test_default_model_greedy_equals_generator(real_server, smollm2_gguf):
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.loading import load_model

    loaded = load_model(str(smollm2_gguf))
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}])
    ref = Generator(loaded.model, tok).generate([tok.encode(text)], SamplingParams(max_new_tokens=24))[0]
    r = real_server.client().completions.create(model=DEFAULT_MODEL, prompt=tok.encode(text), max_tokens=24)
    assert r.choices[0].text == ref.text
