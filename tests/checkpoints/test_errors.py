"""Bad checkpoints raise CheckpointError/ConfigError with a one-line message saying what is wrong."""

import copy
import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from fmstack.checkpoints import gguf_quants, load_weights, open_checkpoint, read_gguf_metadata
from fmstack.errors import CheckpointError, ConfigError, FmstackError
from fmstack.models.llama import Transformer

from tests.helpers import TouchOnUnpickle

from .conftest import write_gguf, write_meta


def _error(path, *match, kind=FmstackError):
    """Open (and load) `path`; return the one-line message of the expected error."""
    with pytest.raises(kind) as info:
        ckpt = open_checkpoint(path)
        with torch.device("meta"):
            model = Transformer(ckpt.config)
        load_weights(model.to_empty(device="cpu"), ckpt)
    return _one_line(info.value, match)


def _one_line(error, match):
    """The error's message: one line, containing every string of `match`."""
    msg = str(error)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture
def hf_dir(hf_models, tmp_path):
    d = tmp_path / "hf"
    hf_models["mha-tied"].save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture
def hf_sharded(hf_models, tmp_path):
    d = tmp_path / "hf-sharded"
    hf_models["mha-tied"].save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    return d


def test_missing_path(tmp_path):
    _error(tmp_path / "nope", "no such file", kind=CheckpointError)


def test_unrecognised_directory(tmp_path):
    _error(tmp_path, "not a recognised checkpoint", kind=CheckpointError)


def test_missing_config_json(hf_dir):
    (hf_dir / "config.json").unlink()
    _error(hf_dir, "config.json not found", kind=CheckpointError)


def test_missing_safetensors(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    _error(hf_dir, "no model.safetensors", kind=CheckpointError)


def test_missing_shard(hf_sharded):
    shard = sorted(hf_sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    _error(hf_sharded, "model.safetensors.index.json", shard.name, "does not exist", kind=CheckpointError)


def test_hf_unknown_architecture(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _error(hf_dir, "unknown architecture", "gpt2", kind=ConfigError)


def test_hf_bad_config_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    _error(hf_dir, "config.json", "not valid JSON", kind=ConfigError)


def test_hf_shape_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    msg = _error(hf_dir, "layers.0.feed_forward.w", "has shape", "expected", kind=CheckpointError)
    assert ("(160, 64)" in msg and "(128, 64)" in msg) or ("(64, 160)" in msg and "(64, 128)" in msg), msg


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_safetensors(hf_dir, hf_sharded, sharded):
    d = hf_sharded if sharded else hf_dir
    f = max(d.glob("model*.safetensors"))
    _truncate(f)
    _error(d, f.name, "truncated or corrupt", kind=CheckpointError)


def test_corrupt_safetensors_header(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    _error(hf_dir, "model.safetensors", "not a valid safetensors file", kind=CheckpointError)


def test_corrupt_index(hf_sharded):
    (hf_sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _error(hf_sharded, "not a valid safetensors index", kind=CheckpointError)


def test_meta_missing_params(hf_models, tmp_path):
    write_meta(hf_models["mha-untied"], tmp_path)
    (tmp_path / "params.json").unlink()
    _error(tmp_path, "params.json not found", kind=CheckpointError)


@pytest.mark.parametrize("garbage", [False, True])
def test_meta_truncated_or_corrupt(hf_models, tmp_path, garbage):
    write_meta(hf_models["mha-untied"], tmp_path)
    f = tmp_path / "consolidated.00.pth"
    if garbage:
        f.write_bytes(b"\x80\x02garbage" * 100)
    else:
        _truncate(f)
    _error(tmp_path, "consolidated.00.pth", "truncated, corrupt", kind=CheckpointError)


def test_meta_shape_mismatch(hf_models, tmp_path):
    write_meta(hf_models["mha-untied"], tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    params["ffn_dim_multiplier"] = None  # ffn 192 instead of the stored 160
    (tmp_path / "params.json").write_text(json.dumps(params))
    _error(tmp_path, "feed_forward.w", "expected (192, 64)", kind=CheckpointError)


def test_meta_shards_do_not_merge(hf_models, tmp_path):
    write_meta(hf_models["mha-untied"], tmp_path, shards=2)
    shutil.copy(tmp_path / "consolidated.00.pth", tmp_path / "consolidated.02.pth")
    _error(tmp_path, "shards have shapes", kind=CheckpointError)


def test_gguf_unknown_architecture(hf_models, tmp_path):
    path = write_gguf(hf_models["mha-tied"], tmp_path / "m.gguf", arch="gpt2")
    _error(path, "unknown architecture", "gpt2", kind=CheckpointError)


@pytest.mark.parametrize("keep", [0.5, 0.995, 0.01])
def test_gguf_truncated(hf_models, tmp_path, keep):
    path = write_gguf(hf_models["mha-tied"], tmp_path / "m.gguf")
    _truncate(path, keep)
    _error(path, "m.gguf", "truncated or corrupt", kind=CheckpointError)
    with pytest.raises(CheckpointError):
        read_gguf_metadata(path)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 10])
def test_gguf_corrupt_header(tmp_path, content):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    _error(path, "m.gguf", "not a valid GGUF file", kind=CheckpointError)


def test_gguf_shape_mismatch(hf_models, tmp_path):
    model = copy.deepcopy(hf_models["gqa-untied"])
    model.config.intermediate_size = 176  # metadata says 176, tensors hold 192 rows
    path = write_gguf(model, tmp_path / "m.gguf")
    msg = _error(path, "layers.0.feed_forward.w", "has shape", "expected", kind=CheckpointError)
    assert ("(192, 64)" in msg and "(176, 64)" in msg) or ("(64, 192)" in msg and "(64, 176)" in msg), msg


def test_gguf_unsupported_quant_type(hf_models, tmp_path):
    q8_1 = gguf.GGMLQuantizationType.Q8_1  # gguf can write it but not dequantize it
    block, size = gguf.GGML_QUANT_SIZES[q8_1]
    raw = np.zeros((64, 64 // block * size), dtype=np.uint8)
    path = write_gguf(hf_models["mha-tied"], tmp_path / "m.gguf", extra_tensors={"blk.9.attn_q.weight": (raw, q8_1)})
    _error(path, "blk.9.attn_q.weight", "Q8_1", "cannot be dequantized", kind=CheckpointError)


def test_gguf_unsupported_quant_type_at_load(hf_models, tmp_path, monkeypatch):
    path = write_gguf(hf_models["mha-tied"], tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    ckpt = open_checkpoint(path)

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    monkeypatch.delitem(gguf_quants.TORCH_DEQUANT, gguf.GGMLQuantizationType.Q8_0)  # so the package is asked
    with pytest.raises(CheckpointError, match="type Q8_0, which cannot be dequantized"):
        dict(ckpt.tensors(None))


# -- unsafe pickles: refused by torch.load(weights_only=True), never run -----------------------------
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_meta_unsafe_pickle_is_refused_and_not_run(hf_models, tmp_path, zip_format):
    d = write_meta(hf_models["mha-untied"], tmp_path / "meta")
    f = d / "consolidated.00.pth"
    marker = tmp_path / "payload-ran"
    state = torch.load(f, weights_only=True)
    state["extra"] = TouchOnUnpickle(marker)
    torch.save(state, f, _use_new_zipfile_serialization=zip_format)
    torch.load(f, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()
    msg = _error(d, "consolidated.00.pth", "refused to load as unsafe", "weights_only=True", kind=CheckpointError)
    assert "truncated" not in msg and "corrupt" not in msg, msg
    assert not marker.exists(), "the payload ran"


def test_meta_legacy_format_is_named(hf_models, tmp_path):
    """A safe legacy-format shard still gets the legacy message (it cannot be memory-mapped)."""
    d = write_meta(hf_models["mha-untied"], tmp_path)
    f = d / "consolidated.00.pth"
    torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    msg = _error(d, "consolidated.00.pth", "legacy torch.save format", kind=CheckpointError)
    assert "unsafe" not in msg, msg


# -- fmstack's own format ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native_dirs(tmp_path_factory):
    """Float, int8 and int4 fmstack checkpoints of one tiny random GQA model."""
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.config import named_config
    from fmstack.quant import QuantSpec, quantize_model

    root = tmp_path_factory.mktemp("native")
    out = {}
    for mode in ("float", "int8", "int4"):
        model = Transformer(named_config("tiny-gqa"))
        model.init_weights(generator=torch.Generator().manual_seed(0))
        keep = {}
        if mode != "float":
            quantize_model(model, QuantSpec(mode, 32), keep=keep)
        out[mode] = save_checkpoint(root / mode, model, quantized=keep or None)
    return out


def _native_error(native_dirs, tmp_path, mode, edit_config=None, drop=None, *match):
    """Copy the `mode` checkpoint, edit its config.json / drop safetensors keys, load it through
    `load_model` (the quantized path too); return the one-line CheckpointError message."""
    from safetensors.torch import load_file, save_file

    from fmstack.loading import load_model

    d = tmp_path / mode
    shutil.copytree(native_dirs[mode], d)
    if edit_config is not None:
        cfg = d / "config.json"
        cfg.write_text(json.dumps(edit_config(json.loads(cfg.read_text()))))
    if drop is not None:
        tensors = load_file(str(d / "model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(str(d))
    return _one_line(info.value, match)


def _set(path, value):
    def edit(cfg):
        keys = path.split(".")
        target = cfg
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return cfg
    return edit


def test_native_loads_when_intact(native_dirs):
    from fmstack.loading import load_model

    for mode in ("float", "int8", "int4"):
        assert load_model(str(native_dirs[mode])).config.name == "tiny-gqa"


@pytest.mark.parametrize("edit, match", [
    (lambda cfg: cfg | {"model": None}, "config.json: not a valid fmstack config"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "model"}, "config.json: not a valid fmstack config ('model')"),
    (_set("model.n_heads", "eight"), "config.json: not a valid fmstack config"),
    (_set("format_version", 7), "fmstack format version 7 is not supported"),
])
def test_native_bad_config_json(native_dirs, tmp_path, edit, match):
    _native_error(native_dirs, tmp_path, "float", edit, None, match)


@pytest.mark.parametrize("mode, edit, match", [
    ("int8", _set("quantization.mode", "int3"), "unknown or unsupported quantization"),
    ("int8", _set("quantization", "int8"), "unknown or unsupported quantization \"int8\""),
    ("int4", _set("quantization.group_size", 7), "--group-size 7 is not supported"),
])
def test_native_unknown_quantization_scheme(native_dirs, tmp_path, mode, edit, match):
    _native_error(native_dirs, tmp_path, mode, edit, None, "config.json", match, "int8, int4, gptq")


@pytest.mark.parametrize("mode, key", [("int8", "layers.0.attn.wo.qweight"), ("int8", "layers.1.mlp.w_down.scales"),
                                       ("int4", "output.zeros")])
def test_native_missing_quantized_tensors(native_dirs, tmp_path, mode, key):
    module = key.rsplit(".", 1)[0]
    _native_error(native_dirs, tmp_path, mode, None, key, "model.safetensors", f"missing quantized tensors for {module}",
                  key)


def test_native_quantized_tensors_of_another_mode(native_dirs, tmp_path):
    _native_error(native_dirs, tmp_path, "int4", _set("quantization.mode", "int8"), None, "model.safetensors",
                  "do not fit the int8 layout")
