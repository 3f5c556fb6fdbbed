"""Weight-only quantization applied to a built model from outside: every projection of every block
and the output head become int8 (per channel) or int4 (group-wise) modules; the embedding and
norms stay in the run dtype. MoE experts (stacked `[E, N, K]` weights, see `fmstack.models.moe`)
are int8 only, per expert and output channel; their router stays float. `portable` dicts (see `linear.py`) are what checkpoints store."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fmstack.errors import ParameterError
from fmstack.quant import ops
from fmstack.quant.experts import Int8ExpertLinear
from fmstack.quant.linear import (GROUP_SIZES, Int4Linear, Int8Linear, int4_params, quantize_int4_with,
                                  quantize_int8)

log = logging.getLogger(__name__)

MODES = ("int8", "int4", "gptq")


@dataclass(frozen=True)
class QuantSpec:
    """mode int8 | int4 (round to nearest) | gptq (int4, calibrated); group_size for the int4 modes."""

    mode: str
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParameterError(f"quantization mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ParameterError(f"--group-size {self.group_size} is not supported; choose one of "
                                 f"{', '.join(map(str, GROUP_SIZES))}")

    @property
    def bits(self) -> int:
        return 8 if self.mode == "int8" else 4

    @property
    def layout(self) -> tuple[int, int | None]:
        """(bits, group size or None): what the quantized modules hold (int4 and gptq share it)."""
        return self.bits, self.group_size if self.bits == 4 else None

    def to_dict(self) -> dict:
        bits, group_size = self.layout
        return {"mode": self.mode, "bits": bits, "group_size": group_size}


def spec_of(model: nn.Module) -> QuantSpec | None:
    """The quantization the model's projections hold: None for a float model, else int8 or
    int4/group size (how int4 values were chosen, round to nearest or GPTQ, is not visible in the
    modules: a checkpoint records it). Raises ParameterError for a mix of schemes."""
    found = {QuantSpec("int8") if isinstance(m, (Int8Linear, Int8ExpertLinear)) else QuantSpec("int4", m.group_size)
             for m in model.modules() if isinstance(m, (Int8Linear, Int8ExpertLinear, Int4Linear))}
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
    if spec.bits != 4:
        return
    for name, lin in quantizable_linears(model):
        if hasattr(lin, "n_experts"):
            raise ParameterError(f"--quantize {spec.mode}: {name} holds MoE experts, which support int8 only; "
                                 "use --quantize int8")
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
