"""Qwen2, Qwen3, Granite and Mistral against HF transformers' own classes (fp32, random tiny configs).

Each family's HF model is saved with `save_pretrained` and loaded back with `fmstack.loading.load_model`,
so the config conversion and name maps are under test, not only the model code. Norm weights and
biases are randomised (HF initialises them to ones/zeros, which would hide a wrong norm or bias), and
Mistral's window (6) is shorter than the test sequences, so positions outside it matter.
Tolerance: rtol/atol 1e-5 on logits, as tests/models/test_llama.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fmstack.config import from_hf_config
from fmstack.generation.generate import Generator
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model

TOL = dict(rtol=1e-5, atol=1e-5)
WINDOW = 6

_COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
# family -> (HF config class, HF model class, config overrides, what each checks)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False, rope_theta=1e6)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.05,
                     logits_scaling=8.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
}
# Mixtral's own tests are tests/models/test_moe.py; here it joins the CLI check of every family
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
}


def hf_family_model(family: str, vocab_size: int = 512, seed: int = 0):
    """A random HF model of `family` with randomised norms and biases, in eval mode."""
    import transformers

    cfg_cls, model_cls, overrides = {**FAMILIES, **MOE_FAMILIES}[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(vocab_size=vocab_size, **_COMMON, **overrides)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer (vocab 49152), saved from the default GGUF."""
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_model(str(smollm2_gguf)).tokenizer.save(path)
    return path


def save_and_load(hf, path: Path, tokenizer_dir: Path):
    """`save_pretrained` into `path`, add the tokenizer files, load with fmstack: the fmstack model."""
    hf.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return load_model(str(path)).model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, smollm2_tokenizer_dir, tmp_path_factory):
    """(family, HF model, fmstack model loaded from its save_pretrained directory)."""
    hf = hf_family_model(request.param)
    return request.param, hf, save_and_load(hf, tmp_path_factory.mktemp(request.param), smollm2_tokenizer_dir)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """Plain argmax loop over HF's full forward (no generate(): its EOS handling differs)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_config_fields_from_hf(pair):
    family, hf, ours = pair
    cfg = ours.config
    assert cfg == from_hf_config(hf.config.to_dict())
    assert cfg.qkv_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    assert cfg.sliding_window == (WINDOW if family == "mistral" else None)
    if family == "granite":
        assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier,
                cfg.logits_scaling) == (12.0, 0.22, 0.05, 8.0)
    else:
        assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) == (1.0, 1.0, 1.0)
        assert cfg.attention_multiplier is None


@torch.no_grad()
def test_prefill_logits_match_hf(pair):
    _, hf, ours = pair
    tokens = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(tokens), hf(tokens).logits, **TOL)


@torch.no_grad()
def test_cached_decode_matches_hf(pair):
    """Prefill 9 tokens, then decode 13 one at a time through the static cache (past Mistral's window)."""
    _, hf, ours = pair
    tokens = torch.randint(0, 512, (2, 22), generator=torch.Generator().manual_seed(2))
    cache = StaticKVCache(ours.config, batch_size=2, max_seq_len=32)
    positions = torch.arange(22).expand(2, -1)
    got = [ours(tokens[:, :9], positions[:, :9], cache)]
    for t in range(9, 22):
        got.append(ours(tokens[:, t:t + 1], positions[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(got, dim=1), hf(tokens).logits, **TOL)


def test_greedy_matches_hf_and_batched_equals_single(pair):
    """Generator's greedy tokens equal HF's argmax loop; a left-padded batch gives each row's own tokens."""
    _, hf, ours = pair
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 512, (11,), generator=g).tolist(), torch.randint(0, 512, (4,), generator=g).tolist()
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    gen = Generator(ours, eos_ids=[])
    single = [gen.generate([p], params)[0].token_ids for p in (a, b)]
    assert single == [hf_greedy(hf, a, 12), hf_greedy(hf, b, 12)]
    assert [r.token_ids for r in gen.generate([a, b], params)] == single


@pytest.mark.slow  # CI time (20 min on 2 cores): run with -m slow
@pytest.mark.parametrize("family", ["mistral"])
def test_compiled_equals_eager(family, smollm2_tokenizer_dir, tmp_path):
    """The compiled prefill/decode (sliding-window masks as tensors) gives the eager tokens."""
    hf = hf_family_model(family)
    model = save_and_load(hf, tmp_path, smollm2_tokenizer_dir)
    prompts = [[5, 9, 200, 31, 7, 64, 11, 3], [42, 17, 99]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    eager = [r.token_ids for r in Generator(model, eos_ids=[]).generate(prompts, params)]
    compiled = [r.token_ids for r in Generator(model, eos_ids=[], compile=True).generate(prompts, params)]
    assert compiled == eager == [hf_greedy(hf, p, 10) for p in prompts]


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_cli_generate_json_matches_hf(family, smollm2_tokenizer_dir, tmp_path, capsys):
    """`fmstack generate --model DIR --json` on random tiny weights + SmolLM2's tokenizer: HF's greedy ids."""
    from fmstack.cli import main

    hf = hf_family_model(family, vocab_size=49152)
    save_and_load(hf, tmp_path, smollm2_tokenizer_dir)
    n = 8
    assert main(["generate", "--model", str(tmp_path), "--max-new-tokens", str(n), "--json",
                 "The capital of France is"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = hf_greedy(hf, report["prompt_token_ids"], n)
    got = report["token_ids"]
    assert report["prompt_token_ids"] and got
    if report["finish_reason"] == "eos":  # an EOS id (HF's loop goes on past it)
        assert got == expected[:len(got)] and len(got) <= n
    else:
        assert report["finish_reason"] == "length" and got == expected


def test_paged_engine_matches_hf(pair):
    """The serving engine (paged cache, prefill in chunks of 8 tokens, 4-token blocks) gives HF's greedy
    tokens: for Mistral the window crosses chunk and block boundaries."""
    from fmstack.serve.engine import Engine, EngineConfig, RequestParams

    _, hf, ours = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (15, 5)]
    eng = Engine(ours, None, EngineConfig(block_size=4, num_blocks=40, max_num_batched_tokens=8, max_num_seqs=2,
                                          max_model_len=64))
    got: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, RequestParams(SamplingParams(max_new_tokens=10)),
                        lambda o: got.setdefault(o.request_id, []).extend(o.token_ids))
    while eng.has_work():
        eng.step()
    assert got == {str(i): hf_greedy(hf, p, 10) for i, p in enumerate(prompts)}


# Published parameter counts (HF model cards / safetensors totals).
PUBLISHED = {"qwen2.5-0.5b": 494.03e6, "qwen2.5-7b": 7.6156e9, "qwen3-0.6b": 596.05e6, "qwen3-8b": 8.1907e9,
             "granite-3.1-2b": 2.5335e9, "granite-3.1-8b": 8.1708e9, "mistral-7b": 7.2417e9}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_family_configs_have_published_sizes(name):
    from fmstack.config import named_config
    from fmstack.models.llama import Transformer

    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(named_config(name)).parameters())
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 1e-3


@pytest.mark.parametrize("family", ["qwen2"])
@torch.no_grad()
def test_int8_and_speculative(family, smollm2_tokenizer_dir, tmp_path):
    """int8 keeps Qwen2's q/k/v bias (a float parameter beside the quantized wqkv): logits stay near
    fp32's; speculative decoding with the int8 model as draft gives the fp32 greedy tokens."""
    from fmstack.generation.speculative import SpeculativeGenerator

    hf = hf_family_model(family)
    fp32 = save_and_load(hf, tmp_path, smollm2_tokenizer_dir)
    int8 = load_model(str(tmp_path), quantize="int8").model.eval()
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(6))
    ref, got = fp32(tokens), int8(tokens)
    assert ((got - ref).norm() / ref.norm()).item() < 0.02
    prompt = tokens[0].tolist()
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    target, draft = Generator(fp32, eos_ids=[]), Generator(int8, eos_ids=[])
    spec = SpeculativeGenerator(target, draft, 3).generate(prompt, params)
    assert spec.token_ids == target.generate([prompt], params)[0].token_ids == hf_greedy(hf, prompt, 12)


@pytest.mark.parametrize("mode,family", [("tp", "qwen2"), ("pp", "granite")])
def test_parallel_cli_matches_single_process(mode, family, smollm2_tokenizer_dir, tmp_path):
    """2 gloo ranks: tp slices Qwen2's q/k/v bias by heads; pp's first stage applies Granite's embedding
    multiplier (greedy tokens cannot see `logits_scaling`, a positive divisor)."""
    from tests.parallel.conftest import generate_cli, reference_ids

    save_and_load(hf_family_model(family, vocab_size=49152), tmp_path, smollm2_tokenizer_dir)
    assert generate_cli(mode, tmp_path, n=8)["token_ids"] == reference_ids(tmp_path, 8)


def test_context_parallel_refuses_sliding_window():
    from fmstack.config import named_config
    from fmstack.errors import ParameterError
    from fmstack.parallel.dist import DistInfo
    from fmstack.parallel.ring import ContextParallel

    plan = ContextParallel(DistInfo(0, 2, 0, torch.device("cpu")), group=object())
    with pytest.raises(ParameterError, match="--parallel cp: sliding-window attention"):
        plan.build(named_config("tiny-gqa").replace(sliding_window=4), torch.device("meta"), torch.float32)


def test_bad_family_configs_raise_clear_errors():
    from fmstack.config import ModelConfig
    from fmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="sliding_window must be a positive"):
        ModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8, sliding_window=0)
    with pytest.raises(ConfigError, match="logits_scaling must be positive"):
        ModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8, logits_scaling=0.0)
    qwen2 = hf_family_model("qwen2").config.to_dict()
    with pytest.raises(ConfigError, match="use_sliding_window"):
        from_hf_config(dict(qwen2, use_sliding_window=True))
    with pytest.raises(ConfigError, match="attention_bias"):
        from_hf_config(dict(hf_family_model("qwen3").config.to_dict(), attention_bias=True))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@torch.no_grad()
def test_quantize_command_round_trip(family, smollm2_tokenizer_dir, tmp_path):
    """`fmstack quantize --mode int8` writes the bias / q-k norms and the family config; reloading
    gives the in-memory int8 model's logits (bit-exact when run alone; after other tests of the suite
    have run, up to one float32 ulp apart, hence the tolerance)."""
    from fmstack.cli import main

    save_and_load(hf_family_model(family), tmp_path / "hf", smollm2_tokenizer_dir)
    assert main(["quantize", "--model", str(tmp_path / "hf"), "--mode", "int8", "--out", str(tmp_path / "q")]) == 0
    saved, direct = load_model(str(tmp_path / "q")), load_model(str(tmp_path / "hf"), quantize="int8")
    assert saved.config == direct.config
    tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(saved.model(tokens), direct.model(tokens), rtol=1e-6, atol=1e-6)
