"""Mixtral-style MoE vs HF transformers' MixtralForCausalLM (random tiny config, fp32), loaded from a
`save_pretrained` directory through `fmstack.loading.load_model`; the three expert paths against each
other; int8 experts against their dequantized weights; one compiled decode.

Tolerance: rtol/atol 1e-5 on fp32 logits, as for the dense models (test_llama.py). int8 experts vs a
float MoE holding the dequantized weights: 1e-4 (the scales are applied after the matmul there).
"""

import pytest
import torch

from fmstack.backends import compile_counters
from fmstack.config import ModelConfig, from_hf_config, named_config
from fmstack.errors import ConfigError, ParameterError
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model
from fmstack.models.llama import Transformer
from fmstack.models.moe import MoEFeedForward
from fmstack.quant import QuantSpec, quantize_model, spec_of
from fmstack.quant.experts import Int8ExpertLinear

from tests.conftest import prefill_then_decode

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 256


def hf_mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A random HF Mixtral (norms randomized too), saved with save_pretrained and loaded by fmstack."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    hf = MixtralForCausalLM(hf_mixtral_config()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "experts" in name or "gate" in name:
                p.normal_(0.0, 0.1)  # spread the router logits so the top-k choice is not a near tie
    path = tmp_path_factory.mktemp("mixtral")
    hf.save_pretrained(path)
    from tokenizers import Tokenizer, models  # load_model reads the directory's tokenizer too

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(str(path / "tokenizer.json"))
    return hf, load_model(str(path)).model


def tokens_of(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_config_and_name_map(hf_and_ours):
    _, ours = hf_and_ours
    cfg = ours.config
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.ffn_dim) == (4, 2, 96)
    assert isinstance(ours.layers[1].mlp, MoEFeedForward)
    assert tuple(ours.layers[1].mlp.w_gate_up.weight.shape) == (4, 192, 64)
    assert tuple(ours.layers[1].mlp.w_down.weight.shape) == (4, 64, 96)


@torch.no_grad()
def test_prefill_logits_match_hf(hf_and_ours):
    hf, ours = hf_and_ours
    tokens = tokens_of(1, (2, 23))
    torch.testing.assert_close(ours(tokens), hf(tokens).logits, **TOL)


@torch.no_grad()
def test_cached_decode_matches_hf(hf_and_ours):
    """Prefill 9 tokens, then decode 8 one at a time (eager: grouped experts; the other paths are
    compared with it below and run compiled in the compiled test)."""
    hf, ours = hf_and_ours
    tokens = tokens_of(2, (2, 17))
    torch.testing.assert_close(prefill_then_decode(ours, tokens, 9), hf(tokens).logits, **TOL)


@torch.no_grad()
def test_greedy_tokens_identical_to_hf_argmax(hf_and_ours):
    hf, ours = hf_and_ours
    prompt = tokens_of(3, (1, 6))
    ids = prompt
    for _ in range(12):  # plain argmax loop, full recompute each step
        ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = Generator(ours, eos_ids=[], max_seq_len=64).generate([prompt[0].tolist()], SamplingParams(max_new_tokens=12))
    assert got[0].token_ids == ids[0, 6:].tolist()


@pytest.mark.parametrize("draft", ["dense", "int8-self"])
def test_speculative_decoding_with_mixtral_target(hf_and_ours, draft):
    """Speculative decoding with the Mixtral as target gives its greedy tokens, with a random dense
    draft (mostly rejected) and with an int8 copy of itself (mostly accepted)."""
    from fmstack.generation.speculative import SpeculativeGenerator
    from fmstack.models.build import build_model
    from fmstack.quant import quantize_model

    _, ours = hf_and_ours
    if draft == "dense":
        small = build_model(named_config("tiny-gqa").replace(vocab_size=VOCAB))
        small.init_weights(std=0.1, generator=torch.Generator().manual_seed(8))
    else:
        small = Transformer(ours.config)
        small.load_state_dict(ours.state_dict())
        quantize_model(small, QuantSpec("int8"))
    prompt, params = tokens_of(8, (1, 7))[0].tolist(), SamplingParams(max_new_tokens=14, ignore_eos=True)
    target = Generator(ours, eos_ids=[], max_seq_len=64)
    want = target.generate([prompt], params)[0].token_ids
    spec = SpeculativeGenerator(target, Generator(small.eval(), eos_ids=[], max_seq_len=64), 3)
    assert spec.generate(prompt, params).token_ids == want


def test_batched_generation_equals_single(hf_and_ours):
    _, ours = hf_and_ours
    gen = Generator(ours, eos_ids=[], max_seq_len=64)
    prompts = [tokens_of(4, (1, 11))[0].tolist(), tokens_of(5, (1, 4))[0].tolist(), tokens_of(6, (1, 7))[0].tolist()]
    params = SamplingParams(max_new_tokens=10)
    batched = [o.token_ids for o in gen.generate(prompts, params)]
    assert batched == [gen.generate([p], params)[0].token_ids for p in prompts]


def naive_moe(moe, h: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert, from the stacked weights as plain matrices (the definition)."""
    probs = torch.softmax(moe.gate(h).float(), dim=-1)
    out = torch.zeros_like(h)
    for n in range(h.shape[0]):
        top, ids = probs[n].topk(moe.top_k)
        for w, e in zip(top / top.sum(), ids.tolist()):
            gate, up = (moe.w_gate_up.weight[e].float() @ h[n]).chunk(2)
            out[n] += w * (moe.w_down.weight[e].float() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("n_tokens", [1, 2, 13])
@torch.no_grad()
def test_expert_paths_agree_with_definition(hf_and_ours, n_tokens):
    moe = hf_and_ours[1].layers[0].mlp
    h = torch.randn(n_tokens, 64, generator=torch.Generator().manual_seed(n_tokens))
    weights, experts = moe.route(h)
    expected = naive_moe(moe, h)
    for path in (moe.gathered, moe.grouped, moe.dense):
        torch.testing.assert_close(path(h, weights, experts), expected, **TOL)
    torch.testing.assert_close(moe(h[None])[0], expected, **TOL)


@torch.no_grad()
def test_int8_experts_match_dequantized_reference():
    """Every path of an int8 MoE equals a float MoE whose experts hold q * scale."""
    loaded = load_model("random:tiny-moe", seed=3, quantize="int8").model
    assert spec_of(loaded) == QuantSpec("int8")
    moe = loaded.layers[0].mlp
    assert isinstance(moe.w_gate_up, Int8ExpertLinear) and moe.w_gate_up.scales.shape == (4, 192)
    ref = MoEFeedForward(loaded.config)
    ref.gate.weight.copy_(moe.gate.weight)
    for name in ("w_gate_up", "w_down"):
        q = getattr(moe, name)
        getattr(ref, name).weight.copy_(q.weight.float() * q.scales[..., None])
    h = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    for n in (1, 2, 9):
        weights, experts = ref.route(h[:n])
        for path in ("gathered", "grouped", "dense"):
            got = getattr(moe, path)(h[:n], weights, experts)
            torch.testing.assert_close(got, getattr(ref, path)(h[:n], weights, experts), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_int8_moe_checkpoint_round_trip(tmp_path):
    """`fmstack quantize --mode int8` output of a MoE model loads back with the same experts and logits."""
    from fmstack.checkpoints.native import save_checkpoint

    model, keep = load_model("random:tiny-moe", seed=4).model, {}
    quantize_model(model, QuantSpec("int8"), keep=keep)
    assert keep["layers.1.mlp.w_down.qweight"].shape == (4, 64, 96)
    back = load_model(str(save_checkpoint(tmp_path / "q8", model, quantized=keep))).model
    assert torch.equal(back.layers[1].mlp.w_down.weight, model.layers[1].mlp.w_down.weight)
    tokens = tokens_of(7, (2, 9))
    torch.testing.assert_close(back(tokens), model(tokens), rtol=0, atol=0)


REFUSAL = "layers.0.mlp.w_gate_up holds MoE experts, which support int8 only; use --quantize int8"


def test_int4_experts_refused_with_clear_error():
    with pytest.raises(ParameterError, match=REFUSAL):
        quantize_model(load_model("random:tiny-moe").model, QuantSpec("int4", 32))


def test_gptq_and_int4_experts_refused_by_api_and_commands(tmp_path, capsys):
    """GPTQ (int4) on stacked experts stops before calibrating; `quantize --mode int4` and `generate
    --quantize int4` exit 2 with the int8-only error."""
    from fmstack.cli import main
    from fmstack.quant.gptq import gptq_quantize

    with pytest.raises(ParameterError, match="--quantize gptq: " + REFUSAL):
        gptq_quantize(load_model("random:tiny-moe").model, tokens_of(0, (2, 16)), QuantSpec("gptq", 32))
    assert main(["quantize", "--model", "random:tiny-moe", "--mode", "int4", "--out", str(tmp_path / "q")]) == 2
    assert REFUSAL in capsys.readouterr().err
    assert main(["generate", "--model", "random:tiny-moe", "--quantize", "int4", "--max-new-tokens", "2", "hi"]) == 2
    assert REFUSAL in capsys.readouterr().err


def test_compiled_decode_equals_eager_without_graph_breaks():
    model = load_model("random:tiny-moe", seed=1).model
    prompt, params = list(range(10, 17)), SamplingParams(max_new_tokens=8)
    want = Generator(model, eos_ids=[], max_seq_len=64).generate([prompt], params)[0].token_ids
    before = compile_counters()
    gen = Generator(model, eos_ids=[], compile=True, max_seq_len=64)
    got = gen.generate([prompt], params)[0].token_ids
    after = compile_counters()
    assert got == want
    assert after["graph_breaks"] == before["graph_breaks"]
    # prefill + decode; the decode step traced in a background process where the cache saves steps whole
    assert after["graphs"] - before["graphs"] == 2 - gen._decode_step.background_builds


def test_configs():
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(named_config("mixtral-8x7b")).parameters())
    assert n == 46_702_792_704  # Mixtral-8x7B's published parameter count
    cfg = from_hf_config(hf_mixtral_config().to_dict())
    assert (cfg.n_experts, cfg.n_experts_per_token) == (4, 2)
    assert ModelConfig.from_dict(named_config("tiny-moe").to_dict()) == named_config("tiny-moe")
    with pytest.raises(ConfigError, match="1 <= n_experts_per_token <= n_experts"):
        named_config("tiny-moe").replace(n_experts_per_token=5)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        from_hf_config({k: v for k, v in hf_mixtral_config().to_dict().items() if k != "num_experts_per_tok"})
