"""Quantization applied to a built model from outside: every projection of every block and the
output head become quantized modules; norms stay in the run dtype. MoE experts (stacked `[E, N, K]`
weights, see `fmstack.models.moe`) are int8 only, per expert and output channel; their router stays
float. `portable` dicts (see `linear.py`) are what checkpoints store.

Modes (`--quantize`):
  int8     weight-only, per output channel, round to nearest (`linear.py`); embedding stays float.
  int4     weight-only, group-wise (--group-size), round to nearest.
  gptq     int4 chosen with calibration (`fmstack quantize --mode gptq`, then load its output).
  gguf     a quantized GGUF's own blocks kept as they are (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, see
           `gguf_blocks.py`) in `blocks.BlockLinear`, the token embedding too (`BlockEmbedding`, the
           tied head over the same buffers): no requantization, logits equal to the dequantized float
           model's within float32 rounding. Opt-in: not the default until its kernel beats the float model
           (`fmstack.loading.GGUF_BLOCKS_BY_DEFAULT` says why).
  gguf-a8  gguf with int8 activations (per row and block, see `blocks.quantize_activations`).
  w8a8     fmstack's int8 weights in the block layout (channel scale repeated per 32-block) with int8
           activations.
  w4a8     fmstack's int4 (group 32) weights in the block layout with int8 activations.
The block modes (the last four) run `blocks.block_linear`; they are not saved by `fmstack quantize`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fmstack.errors import ParameterError
from fmstack.quant import ops
from fmstack.quant.blocks import BlockEmbedding, BlockLinear, BlockWeight, cat_rows, from_int4, from_int8
from fmstack.quant.experts import Int8ExpertLinear
from fmstack.quant.linear import (GROUP_SIZES, Int4Linear, Int8Linear, int4_params, quantize_int4_with,
                                  quantize_int8)

log = logging.getLogger(__name__)

MODES = ("int8", "int4", "gptq")  # what fmstack checkpoints store
GGUF_MODES = ("gguf", "gguf-a8")  # a GGUF file's own blocks
BLOCK_MODES = GGUF_MODES + ("w8a8", "w4a8")  # modules in the block layout (`blocks.BlockLinear`)
ALL_MODES = MODES + BLOCK_MODES


@dataclass(frozen=True)
class QuantSpec:
    """mode: one of ALL_MODES (see the module docstring); group_size for the int4 modes (w4a8: 32)."""

    mode: str
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.mode not in ALL_MODES:
            raise ParameterError(f"quantization mode {self.mode!r} is unknown; choose one of {', '.join(ALL_MODES)}")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ParameterError(f"--group-size {self.group_size} is not supported; choose one of "
                                 f"{', '.join(map(str, GROUP_SIZES))}")
        if self.mode == "w4a8" and self.group_size != 32:
            raise ParameterError(f"--quantize w4a8 uses groups of 32 (the block layout's); --group-size "
                                 f"{self.group_size} is not supported with it")

    @property
    def bits(self) -> int | None:
        """Weight bits of the round-to-nearest quantizer (None for the GGUF modes: the file's own)."""
        if self.mode in GGUF_MODES:
            return None
        return 8 if self.mode in ("int8", "w8a8") else 4

    @property
    def blocks(self) -> bool:
        """Whether the projections are `BlockLinear` modules (the block layout)."""
        return self.mode in BLOCK_MODES

    @property
    def layout(self) -> tuple[int, int | None]:
        """(bits, group size or None): what the quantized modules hold (int4 and gptq share it)."""
        return self.bits, self.group_size if self.bits == 4 else None

    def check_savable(self) -> None:
        """Raise a ParameterError for a mode fmstack checkpoints do not store (the block modes)."""
        if self.mode not in MODES:
            raise ParameterError(f"--quantize {self.mode} models cannot be saved as a checkpoint; "
                                 f"fmstack checkpoints store {', '.join(MODES)}")

    def to_dict(self) -> dict:
        bits, group_size = self.layout
        return {"mode": self.mode, "bits": bits, "group_size": group_size}


def _spec_of_module(m: nn.Module) -> QuantSpec | None:
    if isinstance(m, (Int8Linear, Int8ExpertLinear)):
        return QuantSpec("int8")
    if isinstance(m, Int4Linear):
        return QuantSpec("int4", m.group_size)
    if isinstance(m, (BlockLinear, BlockEmbedding)):
        return QuantSpec(m.scheme)
    return None


def spec_of(model: nn.Module) -> QuantSpec | None:
    """The quantization the model's projections hold: None for a float model, else int8,
    int4/group size (how int4 values were chosen, round to nearest or GPTQ, is not visible in the
    modules: a checkpoint records it) or a block mode. Raises ParameterError for a mix of schemes."""
    found = {s for s in map(_spec_of_module, model.modules()) if s is not None}
    if len(found) > 1:
        raise ParameterError(f"the model mixes quantization schemes: {sorted(s.mode for s in found)}")
    return found.pop() if found else None


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every projection that is quantized: per block wqkv, wo, w_gate_up, w_down (stacked
    experts in a MoE block); output."""
    out = []
    for i, block in enumerate(model.layers):
        out += [(f"layers.{i}.attn.wqkv", block.attn.wqkv), (f"layers.{i}.attn.wo", block.attn.wo),
                (f"layers.{i}.mlp.w_gate_up", block.mlp.w_gate_up), (f"layers.{i}.mlp.w_down", block.mlp.w_down)]
    out.append(("output", model.output))
    return out


def check_shapes(model: nn.Module, spec: QuantSpec) -> None:
    """Raise a ParameterError naming the first projection whose input width the group size does not divide."""
    if spec.bits is None or (spec.bits == 8 and not spec.blocks):
        return
    for name, lin in quantizable_linears(model):
        if hasattr(lin, "n_experts"):
            raise ParameterError(f"--quantize {spec.mode}: {name} holds MoE experts, which support int8 only; "
                                 "use --quantize int8")
        if spec.blocks and lin.in_features % 32:
            raise ParameterError(f"--quantize {spec.mode}: the input width {lin.in_features} of {name} is not "
                                 "a multiple of 32 (the block layout's)")
        k = lin.in_features
        if k % spec.group_size:
            raise ParameterError(f"--group-size {spec.group_size} does not divide the input width {k} of {name}; "
                                 f"choose a group size that divides {k}")


def rtn_portable(weight: Tensor, spec: QuantSpec) -> dict[str, Tensor]:
    """Round-to-nearest quantization of one weight `[N, K]` (int8 also stacked experts `[E, N, K]`)
    to its portable tensors."""
    if spec.bits == 8:
        q, scales = quantize_int8(weight)
        return {"qweight": q, "scales": scales}
    scales, zeros = int4_params(weight, spec.group_size)
    q = quantize_int4_with(weight, scales, zeros, spec.group_size)
    return {"qweight": ops.pack_uint4(q), "scales": scales, "zeros": zeros}


def module_from_portable(t: dict[str, Tensor], spec: QuantSpec, dtype: torch.dtype) -> nn.Module:
    if spec.mode == "w8a8":
        return BlockLinear(from_int8(t["qweight"], t["scales"]), int8_act=True, scheme=spec.mode)
    if spec.mode == "w4a8":
        return BlockLinear(from_int4(ops.unpack_uint4(t["qweight"]), t["scales"], t["zeros"]), int8_act=True,
                           scheme=spec.mode)
    if spec.bits == 8 and t["qweight"].dim() == 3:
        return Int8ExpertLinear.from_portable(t["qweight"], t["scales"], dtype)
    if spec.bits == 8:
        return Int8Linear.from_portable(t["qweight"], t["scales"], dtype)
    return Int4Linear.from_portable(t["qweight"], t["scales"], t["zeros"], spec.group_size, dtype)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def _install(model: nn.Module, spec: QuantSpec, portable_for: Callable[[str, Tensor], dict[str, Tensor]],
             keep: dict[str, Tensor] | None = None) -> nn.Module:
    """Replace each projection by the quantized module built from `portable_for(name, weight)`."""
    check_shapes(model, spec)
    dtype = model.embed.weight.dtype
    for name, lin in quantizable_linears(model):
        t = portable_for(name, lin.weight)
        if keep is not None:
            keep.update({f"{name}.{k}": v.cpu() for k, v in t.items()})
        _set_module(model, name, module_from_portable(t, spec, dtype))
    return model


def quantize_model(model: nn.Module, spec: QuantSpec,
                   portable_for: Callable[[str, Tensor], dict[str, Tensor]] | None = None,
                   keep: dict[str, Tensor] | None = None) -> nn.Module:
    """Replace the projections with quantized modules, one at a time (float weight freed as we go).

    `portable_for(name, weight)` computes a projection's portable tensors (default: round to nearest;
    tensor parallel passes its own). With `keep`, the portable tensors are also stored there as
    `{name}.{key}` for saving."""
    _install(model, spec, portable_for or (lambda _name, w: rtn_portable(w, spec)), keep)
    log.info("quantized %d projections to %s", len(quantizable_linears(model)), spec.mode)
    return model


def load_quantized(model: nn.Module, spec: QuantSpec, tensors: Callable[[str], dict[str, Tensor]]) -> nn.Module:
    """Install projections from saved portable tensors: `tensors(name)` -> that projection's dict
    (nothing is quantized here, so nothing is logged as quantizing)."""
    return _install(model, spec, lambda name, _w: tensors(name))


# a projection's canonical checkpoint tensors (see `fmstack.checkpoints.base`), its rows in this order
_PARTS = {"attn.wqkv": ("attention.wq", "attention.wk", "attention.wv"), "attn.wo": ("attention.wo",),
          "mlp.w_gate_up": ("feed_forward.w1", "feed_forward.w3"), "mlp.w_down": ("feed_forward.w2",)}


def _projection_blocks(name: str, block_for: Callable[[str], BlockWeight | None]) -> BlockWeight | None:
    """The blocks of projection `name` (`layers.{i}.attn.wqkv`...): its parts' rows concatenated in a
    layout holding each part's values exactly (`blocks.cat_rows`: a K-quant file's Q4_K q/k rows and
    Q6_K v rows become 8-bit block 16 with fp32 scales and mins, so the fused projection stays one
    module); None when a part is not kept as blocks (it is then loaded as float)."""
    _, i, short = name.split(".", 2)
    parts = [block_for(f"layers.{i}.{p}.weight") for p in _PARTS[short]]
    if any(p is None for p in parts):
        return None
    return parts[0] if len(parts) == 1 else cat_rows(parts)


@torch.no_grad()
def install_gguf_blocks(model: nn.Module, spec: QuantSpec, block_for: Callable[[str], BlockWeight | None],
                        device: torch.device) -> int:
    """Put a GGUF file's own blocks into `model` (built on the meta device): `BlockLinear` for each
    projection whose parts are kept as blocks, `BlockEmbedding` for a quantized token embedding (a tied
    head then reads the same buffers). `block_for(canonical name)` is `Checkpoint.block_tensor`. What is
    not replaced stays float, for the checkpoint's float stream. Returns the number of modules installed."""
    if spec.mode not in GGUF_MODES:
        raise ValueError(f"install_gguf_blocks: mode {spec.mode} is not one of {', '.join(GGUF_MODES)}")
    int8_act, dtype, n = spec.mode == "gguf-a8", model.norm.weight.dtype, 0

    def on_device(w: BlockWeight | None) -> BlockWeight | None:
        if w is None:
            return None
        return BlockWeight(w.qweight.to(device), w.scales.to(device),
                           None if w.mins is None else w.mins.to(device), w.bits, w.block)

    emb = on_device(block_for("tok_embeddings.weight"))
    if emb is not None:
        model.embed, n = BlockEmbedding(emb, dtype, scheme=spec.mode), 1
    for name, _lin in quantizable_linears(model):
        if name == "output":
            tied = model.embed.packed_blocks if emb is not None else None
            w = tied if model.config.tie_embeddings else on_device(block_for("output.weight"))
        else:
            w = on_device(_projection_blocks(name, block_for))
        if w is not None:
            _set_module(model, name, BlockLinear(w, int8_act, scheme=spec.mode))
            n += 1
    log.info("kept %d GGUF tensors as blocks (%s)", n, spec.mode)
    return n
