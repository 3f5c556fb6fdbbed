"""The real default model: fmstack's GGUF loading vs HF transformers loading the same file (fp32).

Tolerance: last-token logits within 1e-4 relative (max |diff| / max |logit|); greedy ids identical.
HF's greedy output is taken from a plain argmax loop (HF `generate` bans EOS under min_new_tokens
and masks pad==EOS tokens in chat prompts).
"""

import json
import subprocess
import sys

import pytest
import torch

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    return model, tok


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    from fmstack.loading import load_model

    return load_model(str(smollm2_gguf))


def hf_argmax_loop(model, ids, n, eos_id):
    out, past = [], None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos_id:
                break
            x = torch.tensor([[nxt]])
    return out


def test_config_from_gguf(ours):
    c = ours.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0


def test_last_token_logits_match_hf(ours, hf_model):
    model, tok = hf_model
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    assert ours.tokenizer.encode(PROMPT) == ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1]
        got = ours.model(torch.tensor([ids]))[0, -1]
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-4, rel


def test_cli_generate_json_equals_hf_greedy(smollm2_gguf, hf_model):
    model, tok = hf_model
    proc = subprocess.run(
        [sys.executable, "-m", "fmstack", "generate", "--model", str(smollm2_gguf), "--max-new-tokens", "32",
         "--json", PROMPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("text", "prompt_token_ids", "token_ids", "prefill_s", "decode_s", "decode_tokens_per_s"):
        assert key in out
    prompt_ids = tok(PROMPT, add_special_tokens=False).input_ids
    assert out["prompt_token_ids"] == prompt_ids
    expected = hf_argmax_loop(model, prompt_ids, 32, tok.eos_token_id)
    assert out["token_ids"] == expected
    assert out["text"] == tok.decode(expected, skip_special_tokens=True)


def test_chat_greedy_equals_hf(ours, hf_model):
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams

    model, tok = hf_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = ours.tokenizer.encode(text)
    assert ids == tok(text, add_special_tokens=False).input_ids
    res = Generator(ours.model, ours.tokenizer).generate([ids], SamplingParams(max_new_tokens=24))[0]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert res.token_ids == hf_argmax_loop(model, ids, 24, im_end)
