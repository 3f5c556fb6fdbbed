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
from fmstack.quant import MODES, QuantSpec, spec_of

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
    if spec is not None:
        spec.check_savable()
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


def _read_config(path: Path) -> tuple[dict[str, Any], ModelConfig, QuantSpec | None]:
    """config.json -> (raw dict, model config, quantization scheme or None for a float checkpoint);
    CheckpointError naming config.json and what is wrong with it."""
    cfg = path / "config.json"
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object, found {type(raw).__name__}")
    try:
        config = ModelConfig.from_dict(raw["model"])
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{cfg}: not a valid fmstack config ({e})") from None
    if raw.get("format_version") != VERSION:
        raise CheckpointError(f"{path}: fmstack format version {raw.get('format_version')} is not supported "
                              f"(this fmstack reads version {VERSION})")
    quant = raw.get("quantization")
    if quant is None:
        return raw, config, None
    try:
        return raw, config, QuantSpec(quant["mode"], quant.get("group_size") or 32)
    except (TypeError, KeyError, AttributeError, ParameterError) as e:
        why = str(e) if isinstance(e, ParameterError) else 'expected an object {"mode": ..., "group_size": ...}'
        raise CheckpointError(f"{cfg}: unknown or unsupported quantization {json.dumps(quant)} ({why}); "
                              f"this fmstack reads modes {', '.join(MODES)}") from None


def _check_quantized(weights: Path, module: str, found: dict[str, Tensor], mode: str) -> None:
    """The portable tensors of one projection are complete and of the mode's layout (see
    quant/linear.py): int8 `qweight` int8 `[out, in]` + `scales [out]`; int4 (and gptq) `qweight`
    uint8 `[out, in/2]` + `scales`, `zeros` `[out, in/group]`."""
    int8 = mode == "int8"
    need = ("qweight", "scales") if int8 else QUANT_KEYS
    missing = [f"{module}.{k}" for k in need if k not in found]
    if missing:
        raise CheckpointError(f"{weights}: missing quantized tensors for {module}: {', '.join(missing)} "
                              f"(mode {mode} stores {', '.join(need)} per projection)")
    q, scales = found["qweight"], found["scales"]
    want = torch.int8 if int8 else torch.uint8
    if int8:  # also stacked MoE experts: qweight [E, out, in], scales [E, out]
        bad = q.dim() not in (2, 3) or scales.shape != q.shape[:-1]
    else:
        bad = q.dim() != 2 or scales.dim() != 2 or scales.shape[:1] != q.shape[:1] or found["zeros"].shape != scales.shape
    if q.dtype != want or bad:
        shapes = ", ".join(f"{k} {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}" for k, t in found.items())
        raise CheckpointError(f"{weights}: quantized tensors for {module} ({shapes}) do not fit the {mode} "
                              f"layout of config.json (qweight {str(want).removeprefix('torch.')} "
                              f"[out, {'in' if int8 else 'in/2'}], scales [out{'' if int8 else ', groups'}])")


def open_native(path: Path) -> Checkpoint:
    raw, config, quant = _read_config(path)
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
        _check_quantized(weights, module, found, quant.mode)
        return found

    has_tok = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    return Checkpoint(path=path, format=FORMAT, config=config, tensors=tensors,
                      tokenizer_path=path if has_tok else None, metadata={"config": raw},
                      quant=quant, quant_tensors=quant_tensors if quant is not None else None)
