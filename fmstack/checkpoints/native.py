"""fmstack's own checkpoint directory, written by `fmstack quantize` (and fine-tuning):

    config.json        {"format": "fmstack", "format_version": 1, "model": {...ModelConfig},
                        "quantization": null | {"mode", "bits", "group_size"}, "source": "..."}
    model.safetensors  float tensors under canonical names (see base.py); quantized projections
                       as `{module}.qweight|scales|zeros` in the portable layout (see quant/linear.py)
    tokenizer.json | tokenizer.model, tokenizer_config.json
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fmstack.checkpoints.base import Checkpoint, TensorStream, float_targets
from fmstack.config import ModelConfig
from fmstack.errors import CheckpointError, ConfigError, ParameterError
from fmstack.quant import QuantSpec, spec_of

log = logging.getLogger(__name__)

FORMAT, VERSION = "fmstack", 1
WEIGHTS = "model.safetensors"
QUANT_KEYS = ("qweight", "scales", "zeros")


def detect(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def canonical_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's float weights under canonical names (fused projections split back), as views."""
    return {name: dest[row:row + shape[0]] for name, (dest, row, shape) in float_targets(model).items()}


def save_checkpoint(directory: str | Path, model: nn.Module, tokenizer=None,
                    quantized: dict[str, Tensor] | None = None, source: str | None = None,
                    spec: QuantSpec | None = None) -> Path:
    """Write `model` (float parts) + `quantized` portable tensors + tokenizer to `directory`.
    `spec`: how a quantized model was quantized (e.g. gptq); default: what its modules hold."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    held = spec_of(model)
    spec = spec or held
    if spec is not None and (held is None or held.layout != spec.layout):
        raise CheckpointError(f"save_checkpoint: spec {spec.mode} does not match the model's projections "
                              f"({held.mode if held else 'float'})")
    if spec is not None and not quantized:
        raise CheckpointError("a quantized model can only be saved with its portable tensors (quantized=...)")
    tensors = {k: v.detach().to("cpu").clone() for k, v in canonical_state(model).items()}  # views share storage
    tensors.update({k: v.contiguous() for k, v in (quantized or {}).items()})
    save_file(tensors, str(d / WEIGHTS))
    mask = os.umask(0)  # safetensors creates its file 0600; give it the mode open() would: 0666 less the umask
    os.umask(mask)
    os.chmod(d / WEIGHTS, 0o666 & ~mask)
    config = {"format": FORMAT, "format_version": VERSION, "model": model.config.to_dict(),
              "quantization": spec.to_dict() if spec is not None else None, "source": source}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(d)
    log.info("saved %s checkpoint to %s", spec.mode if spec else "float", d)
    return d


def _quant_spec(raw: dict[str, Any], path: Path) -> QuantSpec | None:
    """The `quantization` entry of config.json as a QuantSpec (None: a float checkpoint)."""
    q = raw.get("quantization")
    if q is None:
        return None
    try:
        return QuantSpec(q["mode"], q.get("group_size") or 32)
    except (KeyError, TypeError, AttributeError, ParameterError) as e:
        raise CheckpointError(f"{path}/config.json: quantization {q!r} is not valid ({e}); expected "
                              '{"mode": "int8" | "int4" | "gptq", "group_size": 32 | 64 | 128 | 256 | null}') from None


def open_native(path: Path) -> Checkpoint:
    try:
        raw: dict[str, Any] = json.loads((path / "config.json").read_text())
        config = ModelConfig.from_dict(raw["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}/config.json: not a valid fmstack config ({e})") from None
    quant = _quant_spec(raw, path)
    if raw.get("format_version") != VERSION:
        raise CheckpointError(f"{path}: fmstack format version {raw.get('format_version')} is not supported "
                              f"(this fmstack reads version {VERSION})")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS}")
    try:
        handle = safe_open(str(weights), framework="pt")
        keys = set(handle.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a valid safetensors file ({e})") from None

    def tensors(names: set[str] | None = None) -> TensorStream:
        for key in sorted(keys):
            if key.rsplit(".", 1)[-1] in QUANT_KEYS:
                continue
            if names is None or key in names:
                yield key, handle.get_tensor(key)

    def quant_tensors(module: str) -> dict[str, Tensor]:
        found = {k: handle.get_tensor(f"{module}.{k}") for k in QUANT_KEYS if f"{module}.{k}" in keys}
        if "qweight" not in found:
            raise CheckpointError(f"{weights}: missing quantized tensors for {module}")
        return found

    has_tok = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    return Checkpoint(path=path, format=FORMAT, config=config, tensors=tensors,
                      tokenizer_path=path if has_tok else None, metadata={"config": raw}, quant=quant,
                      quant_tensors=quant_tensors if quant is not None else None)
