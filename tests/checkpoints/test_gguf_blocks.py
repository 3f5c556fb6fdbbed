"""GGUF files run as their own blocks (--quantize gguf): logits equal the dequantized float32 model's
within float32 rounding and greedy tokens are identical, for tiny llama files of every legacy type,
a hand-built K-quant file mixing Q4_K/Q5_K/Q6_K/Q8_0, and the default model; the default mode on CPU;
--quantize choices and clear errors."""

from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from fmstack.errors import ParameterError
from fmstack.loading import load_model, param_bytes
from fmstack.quant import QuantSpec, spec_of
from fmstack.quant.blocks import BlockEmbedding, BlockLinear
from tests.quant.test_blocks import random_gguf_blocks

from .conftest import gguf_writer, random_tokens, write_gguf

QT = gguf.GGMLQuantizationType


def _greedy(model, tokens: torch.Tensor, steps: int) -> list[int]:
    ids = tokens[:1]
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, tokens.shape[1]:].tolist()


def _same_as_dequantized(path, tokens, atol: float = 1e-5):
    native = load_model(str(path), quantize="gguf").model
    ref = load_model(str(path), quantize="none").model
    with torch.no_grad():
        got, want = native(tokens), ref(tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
        assert _greedy(native, tokens, 4) == _greedy(ref, tokens, 4)
    return native, ref


@pytest.mark.parametrize("name, qtype", [("gqa-untied", QT.Q4_0), ("gqa-untied", QT.Q4_1), ("mha-tied", QT.Q8_0)],
                         ids=lambda v: getattr(v, "name", v))
def test_legacy_types_run_as_blocks(hf_models, tokens, tmp_path, name, qtype):
    path = write_gguf(hf_models[name], tmp_path / "m.gguf", qtype=qtype)
    native, ref = _same_as_dequantized(path, tokens)
    assert spec_of(native) == QuantSpec("gguf") and spec_of(ref) is None
    assert isinstance(native.embed, BlockEmbedding) and isinstance(native.layers[0].attn.wqkv, BlockLinear)
    if native.config.tie_embeddings:  # the tied head reads the embedding's buffers
        assert native.output.qweight.data_ptr() == native.embed.qweight.data_ptr()
    assert param_bytes(native) < param_bytes(ref) / 3


# tensor -> (type, super-scale magnitude): a llama.cpp Q4_K_M-like mix, weights ~0.05
K_MIX = {"attn_q": (QT.Q4_K, 4e-4), "attn_k": (QT.Q4_K, 4e-4), "attn_v": (QT.Q6_K, 3e-5),
         "attn_output": (QT.Q5_K, 2e-4), "ffn_gate": (QT.Q4_K, 4e-4), "ffn_up": (QT.Q4_K, 4e-4),
         "ffn_down": (QT.Q6_K, 3e-5), "token_embd": (QT.Q8_0, 2e-3), "output": (QT.Q6_K, 3e-5)}


def write_k_quant_gguf(path, layers: int = 2, dim: int = 256, ffn: int = 512, vocab: int = 512):
    """A llama GGUF whose matrices are random K-quant blocks (the `gguf` package cannot write K-quants)."""
    c = SimpleNamespace(num_hidden_layers=layers, max_position_embeddings=512, hidden_size=dim,
                        intermediate_size=ffn, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                        rope_parameters={"rope_theta": 10000.0}, vocab_size=vocab)
    w = gguf_writer(c, path, "llama", dim // 4)
    shapes = {"attn_q": (dim, dim), "attn_k": (dim // 2, dim), "attn_v": (dim // 2, dim), "attn_output": (dim, dim),
              "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}
    names = [(f"blk.{i}.{t}.weight", t, s) for i in range(layers) for t, s in shapes.items()]
    names += [("token_embd.weight", "token_embd", (vocab, dim)), ("output.weight", "output", (vocab, dim))]
    for seed, (name, kind, (rows, cols)) in enumerate(names):
        qtype, scale = K_MIX[kind]
        raw = random_gguf_blocks(qtype, rows, cols, seed=seed, scale=scale).reshape(rows, -1)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    rng = np.random.default_rng(0)
    norms = [f"blk.{i}.{n}.weight" for i in range(layers) for n in ("attn_norm", "ffn_norm")]
    for name in norms + ["output_norm.weight"]:
        w.add_tensor(name, (1 + 0.2 * rng.standard_normal(dim)).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_k_quant_mix_runs_as_blocks(tmp_path):
    path = write_k_quant_gguf(tmp_path / "k.gguf")
    tokens = random_tokens(1, 12)
    native, ref = _same_as_dequantized(path, tokens, atol=1e-4)
    wqkv, w_down = native.layers[0].attn.wqkv, native.layers[0].mlp.w_down
    assert (wqkv.bits, wqkv.block, wqkv.mins is not None) == (8, 16, True)  # Q4_K q/k + Q6_K v: one layout
    assert (w_down.bits, w_down.block, native.layers[0].mlp.w_gate_up.bits) == (8, 16, 4)
    a8 = load_model(str(path), quantize="gguf-a8").model
    assert spec_of(a8) == QuantSpec("gguf-a8")
    with torch.no_grad():
        got, want = a8(tokens), ref(tokens)
    assert 0 < float((got - want).norm() / want.norm()) < 0.05  # int8 activations: the only difference


def test_default_mode_on_cpu(hf_models, tmp_path, monkeypatch):
    import fmstack.loading

    path = write_gguf(hf_models["mha-tied"], tmp_path / "m.gguf", qtype=QT.Q8_0)
    assert spec_of(load_model(str(path), quantize="auto").model) == QuantSpec("gguf")  # the default
    assert spec_of(load_model(str(path), quantize="auto", dtype="bf16").model) is None  # --dtype overrides it
    assert spec_of(load_model(str(path), quantize="none").model) is None  # so does --quantize none
    monkeypatch.setattr(fmstack.loading, "GGUF_BLOCKS_BY_DEFAULT", False)
    assert spec_of(load_model(str(path), quantize="auto").model) is None
    f32 = write_gguf(hf_models["mha-tied"], tmp_path / "f.gguf")
    assert spec_of(load_model(str(f32), quantize="auto").model) is None  # float tensors stay float


def test_default_model_matches_dequantized(smollm2_gguf):
    native, ref = (load_model(str(smollm2_gguf), quantize=q) for q in ("gguf", "none"))
    assert param_bytes(native.model) < 110e6 and param_bytes(ref.model) > 500e6
    tokens = torch.tensor([native.tokenizer.encode("The capital of France is")])
    for m in (native.model, ref.model):  # 3 of 30 layers (Q4_1) keep it fast; embedding and head (Q8_0) whole
        m.layers = m.layers[:3]
    with torch.no_grad():
        got, want = native.model(tokens), ref.model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_block_modes_refuse_what_they_cannot_run():
    with pytest.raises(ParameterError, match="--quantize gguf keeps a GGUF file's own blocks, but .* is a random"):
        load_model("random:tiny-gqa", quantize="gguf")
    with pytest.raises(ParameterError, match="--quantize w4a8 uses groups of 32"):
        load_model("random:tiny-gqa", quantize="w4a8", group_size=64)
    from fmstack.checkpoints import open_checkpoint
    from fmstack.loading import _check_blocks

    ckpt = open_checkpoint("random:tiny-gqa")
    with pytest.raises(ParameterError, match="--quantize w8a8 cannot be combined with --parallel"):
        _check_blocks(ckpt, QuantSpec("w8a8"), plan=object())  # any plan: tp, pp, cp


def test_quantize_choices_on_the_command_line(capsys):
    from fmstack.cli import build_parser, main

    args = build_parser().parse_args(["generate", "--quantize", "gguf-a8", "hi"])
    assert args.quantize == "gguf-a8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--quantize", "q4k", "hi"])
    err = capsys.readouterr().err
    assert "--quantize: invalid choice: 'q4k'" in err and "gguf" in err and "w4a8" in err
    assert main(["generate", "--model", "random:tiny-mha", "--quantize", "gguf", "hi"]) == 2
    assert "--quantize gguf keeps a GGUF file's own blocks" in capsys.readouterr().err


def test_compile_fingerprint_and_saving(hf_models, tmp_path):
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.generation.compile_cache import model_fingerprint

    models = [load_model(str(write_gguf(hf_models["mha-tied"], tmp_path / f"{q.name}.gguf", qtype=q)),
                         quantize="gguf").model for q in (QT.Q8_0, QT.Q4_1)]
    a, b = (model_fingerprint(m, torch.float32) for m in models)
    assert a["quant"]["mode"] == "gguf" and a["blocks"] != b["blocks"]  # one config, two block layouts
    with pytest.raises(ParameterError, match="--quantize gguf models cannot be saved"):
        save_checkpoint(tmp_path / "out", models[0], quantized={"x": torch.zeros(1)})
    assert not (tmp_path / "out" / "model.safetensors").exists()
