"""The one place a model spec becomes a ready model: checkpoint -> (quantize) -> (parallelize) -> (compile).

The model is built on the meta device, materialized once in its run dtype on its device, and
filled tensor by tensor from the checkpoint, so peak memory stays near one copy of the weights.
Every source, `random:<config>` included, is a checkpoint reader (`fmstack.checkpoints`); model
construction is `fmstack.models.build`, multi-process plans are `fmstack.parallel`.

Stages that take a second or more (opening, tokenizer, building, reading/dequantizing weights,
quantizing) log one info line each, the rest a debug line. SmolLM2-135M Q4_1 GGUF on the shared
2-core dev machine, `load_model("smollm2-135m-instruct")` timed inside the process (page cache warm):
  before (gguf.GGUFReader, numpy dequantization): opening 9.0 s (GGUF metadata), tokenizer 0.3 s,
    building 0.1 s, reading and dequantizing 9.8 s, 19.2 s in all (load average ~8); 29.0 s wall,
    8.2 s CPU at load average ~14; 4.6 s on an idle machine; peak RSS 1.14 GB (`/usr/bin/time -v`).
  after (header parsed with struct: `checkpoints.gguf_file`; torch dequantization:
    `checkpoints.gguf_quants`; weights streamed on one intra-op thread): opening 0.4 s, tokenizer
    0.5 s, building 0.2 s, reading and dequantizing 3.1 s, 4.2 s in all at load average ~14;
    3.4 s wall, 1.1 s CPU (idle-machine wall time not measured: CPU time suggests ~1.1 s); peak RSS 1.09 GB.
`--quantize int8` adds ~11 s.
GGUF blocks kept as they are (`--quantize gguf`, the default for a GGUF on CPU in fp32; measured on the
same machine at load average 13-18, so times are upper bounds): weights 92 MiB instead of 513 MiB;
`ru_maxrss` after `load_model` 640 MB instead of 1055 MB (455 MB of it is the imports); peak RSS of
`fmstack generate --max-new-tokens 16 "hi"` (`/usr/bin/time -v`) 921 MB instead of 1146 MB (the rest
of the difference is eaten by the pure-PyTorch `block_linear` dequantizing a whole weight per call,
113 MB for the tied head); load 2.5-3.3 s instead of 3.5 s; greedy tokens identical.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from fmstack.checkpoints import Checkpoint, is_generated, load_weights, open_checkpoint
from fmstack.checkpoints.base import one_intraop_thread
from fmstack.checkpoints.named import resolve_model_path
from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.models.build import build_meta, build_model, materialize_meta
from fmstack.models.protocol import CausalLM
from fmstack.parallel import ParallelPlan, dist, make_plan
from fmstack.quant import GGUF_MODES, QuantSpec, install_gguf_blocks, load_quantized, quantize_model, spec_of
from fmstack.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGE_LOG_S = 1.0  # a loading stage at least this long gets an info line (shorter: debug)


@dataclass
class LoadedModel:
    model: CausalLM
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


@contextlib.contextmanager
def _stage(what: str):
    """Time one loading stage; info line when it took STAGE_LOG_S or more, else debug."""
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    log.log(logging.INFO if dt >= STAGE_LOG_S else logging.DEBUG, "loading: %s took %.1fs", what, dt)


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
               seed: int = 0, quantize: str | None = None, group_size: int = 32,
               parallel: str | None = None) -> LoadedModel:
    """`spec`: a registry name, a checkpoint path (.gguf, HF dir, Meta dir, fmstack dir), or
    `random:<config name>` (weights drawn from `seed`). `quantize` (int8 | int4) quantizes the
    projections after loading; quantized fmstack checkpoints load their quantized weights directly.
    `parallel` (tp | pp | cp, under torchrun) joins the process group and loads only this rank's
    part (see `fmstack.parallel`); an error on any rank fails every rank."""
    if parallel in (None, "none"):
        return _load(spec, device, dtype, seed, quantize, group_size)
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


# Whether a quantized GGUF on CPU (fp32, one process) runs from its blocks (`--quantize gguf`, exact:
# the dequantized model's logits within float32 rounding) when no --quantize is given. On since the
# row-interleaved kernels (fmstack/native): the default model decodes faster from its 94 MB of blocks
# than from 513 MB of fp32 (benchmarks/results/quant_blocks_cpu.json has both in one run), where the
# first, row-major kernel streamed ~3 GB/s and the default was off (25.7 tok/s against 51.4 for int8).
GGUF_BLOCKS_BY_DEFAULT = True

def _load(spec: str, device, dtype, seed: int, quantize: str | None, group_size: int,
          plan: ParallelPlan | None = None) -> LoadedModel:
    """`load_model` for one process; `plan` builds and slices this rank's part of the model."""
    device = parse_device(device) if isinstance(device, str) else device
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if quantize == "gptq":
        raise ParameterError("--quantize gptq needs calibration: run `fmstack quantize --mode gptq --out DIR` "
                             "and load DIR")
    qspec = QuantSpec(quantize, group_size) if quantize not in (None, "none", "auto") else None
    t0 = time.perf_counter()
    with _stage("opening the checkpoint"):  # GGUF: header, metadata and every tensor's type and shape
        ckpt = open_checkpoint(spec if is_generated(spec) else resolve_model_path(spec), seed=seed, device=device)
    with _stage("tokenizer"):  # first: its temporaries are freed before the weights are materialized
        tokenizer = _tokenizer(ckpt)
    if quantize == "auto":
        auto = (GGUF_BLOCKS_BY_DEFAULT and ckpt.block_tensor is not None and device.type == "cpu"
                and dtype == torch.float32 and plan is None)
        qspec = QuantSpec("gguf") if auto else None
    _check_blocks(ckpt, qspec, plan)
    if ckpt.quant is not None:
        _check_requantize(ckpt, qspec, plan)
        with _stage(f"reading {ckpt.quant.mode} weights"):
            model = _build_quantized(ckpt, device, dtype)
    elif qspec is not None and qspec.mode in GGUF_MODES:
        with _stage("reading GGUF blocks"):
            model = build_meta(ckpt.config, dtype)
            with one_intraop_thread():  # copies of the mapped file: see `one_intraop_thread`
                install_gguf_blocks(model, qspec, ckpt.block_tensor, device)
            materialize_meta(model, device)
            model.tie_weights()
    else:
        with _stage("building"):
            model = plan.build(ckpt.config, device, dtype) if plan else build_model(ckpt.config, device, dtype)
    with _stage("reading weights" if ckpt.format != "gguf" else "reading and dequantizing weights"):
        load_weights(model, ckpt, plan.slice_for if plan else None)
    if qspec is not None and qspec.mode not in GGUF_MODES:
        with _stage(f"quantizing to {qspec.mode}"):
            quantize_model(model, qspec, portable_for=plan.quantizer(qspec) if plan else None)
    model.eval().requires_grad_(False)
    load_s = time.perf_counter() - t0
    quant = spec_of(model) if qspec is not None and qspec.mode in GGUF_MODES else qspec or ckpt.quant
    log.info("loaded %s (%s, %s%s) in %.2fs", ckpt.path, ckpt.format, str(dtype).removeprefix("torch."),
             f", {quant.mode}" if quant else "", load_s)
    return LoadedModel(model, tokenizer, ckpt.config, str(ckpt.path), ckpt.format, load_s)


def _tokenizer(ckpt: Checkpoint):
    """The checkpoint's tokenizer (None without one); a GGUF's tokenizer arrays are dropped from its
    metadata once read (tens of MB for large vocabularies)."""
    if ckpt.tokenizer_path is None:
        return None
    meta = ckpt.metadata if ckpt.format == "gguf" else None
    tokenizer = load_tokenizer(ckpt.tokenizer_path, gguf_metadata=meta)
    if meta:
        for key in [k for k in meta if k.startswith("tokenizer.ggml.")]:
            del meta[key]
    return tokenizer


def _check_blocks(ckpt: Checkpoint, qspec: QuantSpec | None, plan: ParallelPlan | None) -> None:
    """The block modes run on one process; gguf/gguf-a8 need a GGUF file."""
    if qspec is None or not qspec.blocks:
        return
    if plan is not None:
        raise ParameterError(f"--quantize {qspec.mode} cannot be combined with --parallel (block-layout weights "
                             "are not split over ranks); use --quantize int8 or int4, or --quantize none")
    if qspec.mode in GGUF_MODES and ckpt.block_tensor is None:
        raise ParameterError(f"--quantize {qspec.mode} keeps a GGUF file's own blocks, but {ckpt.path} is a "
                             f"{ckpt.format} checkpoint; use --quantize w8a8 or w4a8 for the block layout")


def _check_requantize(ckpt: Checkpoint, qspec: QuantSpec | None, plan: ParallelPlan | None) -> None:
    if plan is not None:
        raise ParameterError(f"--parallel: {ckpt.path} is already quantized; load the float checkpoint "
                             "with --quantize instead (each rank quantizes its shard)")
    if qspec is not None:
        raise ParameterError(f"--quantize {qspec.mode}: {ckpt.path} is already quantized ({ckpt.quant.mode})")


def _build_quantized(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model with its projections installed from the checkpoint's quantized tensors and its other
    parameters materialized (uninitialized) for `load_weights`."""
    model = build_meta(ckpt.config, dtype)
    fetch = ckpt.quant_tensors
    load_quantized(model, ckpt.quant, lambda name: {k: v.to(device) for k, v in fetch(name).items()})
    materialize_meta(model, device)
    model.tie_weights()
    return model


def param_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameter and buffer storage (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
