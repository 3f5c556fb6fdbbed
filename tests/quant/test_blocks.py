"""The block layout's converters: GGUF blocks of every kept type equal `gguf.quants.dequantize` (and
fmstack's torch dequantizer), mixed types concatenate without changing a value, fmstack int8/int4
re-expressed as blocks, the quantized embedding and its tied head, the w8a8/w4a8 modes, clear errors."""

import gguf
import numpy as np
import pytest
import torch

from fmstack.checkpoints import gguf_quants
from fmstack.config import named_config
from fmstack.errors import ParameterError
from fmstack.models.build import build_model
from fmstack.quant import QuantSpec, quantize_model, spec_of
from fmstack.quant.blocks import (BlockEmbedding, BlockLinear, cat_rows, dequantize_blocks, from_int4,
                                  from_int8, with_layout)
from fmstack.quant.gguf_blocks import CONVERTERS, gguf_block_weight
from fmstack.quant.linear import dequantize_int4, int4_params, quantize_int4_with, quantize_int8

QT = gguf.GGMLQuantizationType
# byte offsets of each type's float16 super-scales (d, and dmin/m where it has one)
F16_AT = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def random_gguf_blocks(qtype, rows: int, cols: int, seed: int, scale: float | None = None) -> np.ndarray:
    """`[rows, cols]` of `qtype` as raw bytes: random quants and sub-scales, finite float16 super-scales
    (spread over magnitudes, or ~`scale` when given)."""
    rng = np.random.default_rng(seed)
    values, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // values
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        mag = rng.choice([1e-4, 1e-2, 1.0, 100.0], n) if scale is None else scale
        raw[:, at:at + 2] = (rng.standard_normal(n) * mag).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(-1)


def _bits(t: torch.Tensor) -> np.ndarray:
    return (t.float() + 0.0).numpy().view(np.uint32)  # + 0.0: -0.0 and 0.0 alike (Q4_0's zero loses its sign)


@pytest.mark.parametrize("qtype", list(CONVERTERS), ids=lambda q: q.name)
def test_converters_equal_gguf_dequantize(qtype):
    rows, cols = 6, 512
    raw = random_gguf_blocks(qtype, rows, cols, seed=int(qtype))
    want = torch.from_numpy(gguf.quants.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32))
    w = gguf_block_weight(torch.from_numpy(raw.copy()), qtype, (rows, cols))
    assert w.out_features == rows and w.in_features == cols
    got = dequantize_blocks(w)
    assert torch.isfinite(want).all()
    assert np.array_equal(_bits(got), _bits(want))  # bit for bit
    if qtype in gguf_quants.TORCH_DEQUANT:
        torch_deq = gguf_quants.dequantize(torch.from_numpy(raw.copy()), qtype, (rows, cols))
        assert np.array_equal(_bits(got), _bits(torch_deq))


def test_copied_types_keep_the_file_bytes():
    raw = random_gguf_blocks(QT.Q4_1, 2, 64, seed=3)
    w = gguf_block_weight(torch.from_numpy(raw.copy()), QT.Q4_1, (2, 64))
    blocks = torch.from_numpy(raw.copy()).view(4, 20)
    assert torch.equal(w.qweight.reshape(4, 16), blocks[:, 4:])
    assert torch.equal(w.scales.reshape(4, 1).view(torch.uint8), blocks[:, 0:2])
    assert w.scales.dtype == torch.float16 and w.mins.dtype == torch.float16


def test_q4_0_mins_overflowing_fp16_are_kept_in_fp32():
    raw = random_gguf_blocks(QT.Q4_0, 2, 64, seed=4, scale=1.0).reshape(4, 18)
    raw[1, 0:2] = np.array([10000.0], dtype=np.float16).view(np.uint8)  # -8 * d is beyond fp16's range
    w = gguf_block_weight(torch.from_numpy(raw.reshape(-1)), QT.Q4_0, (2, 64))
    assert w.scales.dtype == w.mins.dtype == torch.float32
    want = torch.from_numpy(gguf.quants.dequantize(raw.reshape(2, -1), QT.Q4_0))
    assert np.array_equal(_bits(dequantize_blocks(w)), _bits(want))


def test_converter_rejects_bad_input():
    with pytest.raises(ValueError, match="Q5_0 is not kept as blocks"):
        gguf_block_weight(torch.zeros(22, dtype=torch.uint8), QT.Q5_0, (1, 32))
    with pytest.raises(ValueError, match="do not hold a \\[2, 256\\] matrix"):
        gguf_block_weight(torch.zeros(144, dtype=torch.uint8), QT.Q4_K, (2, 256))


def test_cat_rows_mixed_types_keep_every_value():
    parts = [gguf_block_weight(torch.from_numpy(random_gguf_blocks(qt, 4, 256, seed=i)), qt, (4, 256))
             for i, qt in enumerate([QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.Q4_1])]
    fused = cat_rows(parts)
    assert (fused.bits, fused.block, fused.scales.dtype, fused.mins is not None) == (8, 16, torch.float32, True)
    assert torch.equal(dequantize_blocks(fused), torch.cat([dequantize_blocks(p) for p in parts]))
    same = cat_rows(parts[3:] * 2)  # one layout: concatenated as it is
    assert (same.bits, same.block, same.scales.dtype) == (4, 32, torch.float16)
    with pytest.raises(ValueError, match="without changing values"):
        with_layout(parts[1], 4, 32, torch.float32, True)


def test_fmstack_int8_and_int4_as_blocks():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)
    assert torch.equal(dequantize_blocks(from_int8(q, s)), q.float() * s[:, None])
    scales, zeros = int4_params(w, 32)
    q4 = quantize_int4_with(w, scales, zeros, 32)
    torch.testing.assert_close(dequantize_blocks(from_int4(q4, scales, zeros)),
                               dequantize_int4(q4, scales, zeros, 32), rtol=0, atol=1e-6)


def test_block_embedding_and_tied_head_share_buffers():
    raw = random_gguf_blocks(QT.Q8_0, 10, 64, seed=5, scale=0.01)
    w = gguf_block_weight(torch.from_numpy(raw), QT.Q8_0, (10, 64))
    emb = BlockEmbedding(w, torch.float32, scheme="gguf")
    head = BlockLinear(emb.packed_blocks, scheme="gguf")
    assert head.qweight.data_ptr() == emb.qweight.data_ptr() and head.scales.data_ptr() == emb.scales.data_ptr()
    tokens = torch.tensor([[3, 0, 9], [3, 3, 1]])
    table = dequantize_blocks(w)
    assert torch.equal(emb(tokens), table[tokens])
    x = torch.randn(2, 64)
    torch.testing.assert_close(head(x), x @ table.T)


@pytest.mark.parametrize("mode", ["w8a8", "w4a8"])
def test_w8a8_w4a8_modes(mode):
    model = build_model(named_config("tiny-gqa"))
    model.init_weights(generator=torch.Generator().manual_seed(1))
    model = quantize_model(model, QuantSpec(mode)).eval()
    assert spec_of(model) == QuantSpec(mode)
    blocks = [m for m in model.modules() if isinstance(m, BlockLinear)]
    assert len(blocks) == 4 * model.config.n_layers + 1 and all(m.int8_act for m in blocks)
    assert {m.bits for m in blocks} == {8 if mode == "w8a8" else 4}
    tokens = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(tokens)
        for m in blocks:
            m.int8_act = False  # the same weights with float activations
        want = model(tokens)
    assert 0 < float((got - want).norm() / want.norm()) < 0.05  # int8 activations: the only difference


def test_block_mode_errors():
    with pytest.raises(ParameterError, match="w4a8 uses groups of 32"):
        QuantSpec("w4a8", 64)
    with pytest.raises(ParameterError, match="cannot be saved"):
        QuantSpec("gguf").check_savable()
    with pytest.raises(ParameterError, match="unknown; choose one of int8, int4, gptq, gguf, gguf-a8, w8a8, w4a8"):
        QuantSpec("q4")
