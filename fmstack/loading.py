"""The one place a model spec becomes a ready model: checkpoint -> (quantize) -> (parallelize) -> (compile).

The model is built on the meta device, materialized once in its run dtype on its device, and
filled tensor by tensor from the checkpoint, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmstack.config import ModelConfig, named_config
from fmstack.errors import ParameterError
from fmstack.models.llama import Transformer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object | None
    config: ModelConfig
    source: str  # path of the checkpoint, or random:<config>
    format: str
    load_s: float


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ParameterError(f"--dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}") from None


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ParameterError(f"--device {name!r} is not a valid device (use cpu or cuda[:N])") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("--device cuda was requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ParameterError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def build_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build on the meta device and materialize (uninitialized) parameters directly on `device`."""
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    return model


def materialize_meta(model: nn.Module, device: torch.device) -> None:
    """Give every parameter still on the meta device real (uninitialized) storage on `device`."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
               seed: int = 0, quantize: str | None = None, group_size: int = 32,
               parallel: str | None = None) -> LoadedModel:
    """`spec`: a registry name, a checkpoint path (.gguf, HF dir, Meta dir, fmstack dir), or
    `random:<config name>`. `quantize` (int8 | int4) quantizes the projections after loading;
    quantized fmstack checkpoints load their quantized weights directly. `parallel` (tp | pp, under
    torchrun) joins the process group and loads only this rank's part (see `fmstack.parallel`);
    an error on any rank fails every rank."""
    if parallel in (None, "none"):
        return _load(spec, device, dtype, seed, quantize, group_size)
    from fmstack.parallel import dist, make_plan

    info = dist.init_distributed(parse_device(device) if isinstance(device, str) else device)
    dist.seed_ranks_alike()  # process-wide: same default RNG on every rank, so unseeded sampling agrees
    loaded, error = None, None
    try:
        plan = make_plan(parallel, info)
        loaded = _load(spec, info.device, dtype, seed, quantize, group_size, plan)
        dist.fault_point("load")
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = e
    dist.fail_together(error)
    loaded.model = plan.finish(loaded.model).eval().requires_grad_(False)
    return loaded


def _load(spec: str, device, dtype, seed: int, quantize: str | None, group_size: int, plan=None) -> LoadedModel:
    """`load_model` for one process; `plan` builds and slices this rank's part of the model."""
    from fmstack.quant import QuantSpec, load_quantized, quantize_model

    device = parse_device(device) if isinstance(device, str) else device
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if quantize == "gptq":
        raise ParameterError("--quantize gptq needs calibration: run `fmstack quantize --mode gptq --out DIR` "
                             "and load DIR")
    qspec = QuantSpec(quantize, group_size) if quantize else None
    t0 = time.perf_counter()
    if spec.startswith("random:"):
        config = named_config(spec.split(":", 1)[1])
        tokenizer, fmt = None, "random"
        if plan is None:
            model = build_model(config, device, dtype)
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            model.init_weights(generator=g)
        else:  # each rank draws the same full tensors, keeps its part
            from fmstack.checkpoints import load_weights
            from fmstack.parallel import random_checkpoint

            model = plan.build(config, device, dtype)
            load_weights(model, random_checkpoint(config, seed), plan.slice_for)
    else:
        from fmstack.checkpoints import load_weights, open_checkpoint
        from fmstack.checkpoints.named import resolve_model_path
        from fmstack.tokenizer import load_tokenizer

        path = resolve_model_path(spec)
        ckpt = open_checkpoint(path)
        config = ckpt.config
        # Tokenizer first: its temporaries are freed before the weights are materialized.
        meta = ckpt.metadata if ckpt.format == "gguf" else None
        tokenizer = load_tokenizer(ckpt.tokenizer_path, gguf_metadata=meta) if ckpt.tokenizer_path else None
        if meta:
            for key in [k for k in meta if k.startswith("tokenizer.ggml.")]:
                del meta[key]
        saved_quant = ckpt.metadata.get("quantization") if ckpt.format == "fmstack" else None
        if saved_quant:
            if plan is not None:
                raise ParameterError(f"--parallel: {path} is already quantized; load the float checkpoint "
                                     "with --quantize instead (each rank quantizes its shard)")
            if qspec is not None:
                raise ParameterError(f"--quantize {quantize}: {path} is already quantized ({saved_quant['mode']})")
            with torch.device("meta"):
                model = Transformer(config).to(dtype)
            fetch = ckpt.metadata["quant_tensors"]
            saved = QuantSpec(saved_quant["mode"], saved_quant.get("group_size") or 32)
            load_quantized(model, saved, lambda name: {k: v.to(device) for k, v in fetch(name).items()})
            materialize_meta(model, device)
            model.tie_weights()
        else:
            model = plan.build(config, device, dtype) if plan else build_model(config, device, dtype)
        load_weights(model, ckpt, plan.slice_for if plan else None)
        fmt, spec = ckpt.format, str(path)
    if qspec is not None:
        portable_for = getattr(plan, "portable_for", None)  # tensor parallel: whole-row int8 scales
        quantize_model(model, qspec, portable_for=portable_for(qspec) if portable_for else None)
    model.eval().requires_grad_(False)
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s, %s%s) in %.2fs", spec, fmt, str(dtype).removeprefix("torch."),
             f", {qspec.mode}" if qspec else "", load_s)
    return LoadedModel(model, tokenizer, config, spec, fmt, load_s)


def param_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameter and buffer storage (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def default_model_path() -> Path:
    from fmstack.checkpoints.named import DEFAULT_MODEL, resolve_model_path

    return resolve_model_path(DEFAULT_MODEL)
