"""What a parallel plan is (`ParallelPlan`), and the one way ranks split a range (`chunk`).

A plan is applied to the single-device model from outside: `build` makes this rank's part of the
model (what it does not hold stays on the meta device and is never read), `slice_for` cuts this
rank's part out of each full checkpoint tensor as it streams past, `quantizer` may replace the
default quantizer (tensor parallel: whole-row int8 scales), and `finish` turns the loaded (and
quantized) part into the model callers use. Tensor (`tensor.py`), pipeline (`pipeline.py`) and
context (`ring.py`) parallel implement it; `fmstack.loading.load_model` drives it.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fmstack.config import ModelConfig
from fmstack.models.llama import Transformer
from fmstack.models.protocol import CausalLM

Quantizer = Callable[[str, Tensor], dict[str, Tensor]]  # (projection name, weight) -> portable tensors


def chunk(n: int, parts: int, i: int) -> range:
    """Part `i` of `range(n)` cut into `parts` contiguous pieces whose sizes differ by at most one."""
    size, extra = divmod(n, parts)
    start = i * size + min(i, extra)
    return range(start, start + size + (i < extra))


@runtime_checkable
class ParallelPlan(Protocol):
    """One rank's share of a multi-process model (see the module docstring)."""

    def build(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
        """This rank's part of the model: its parameters materialized (uninitialized) on `device`."""
        ...

    def slice_for(self, name: str, tensor: Tensor) -> Tensor:
        """The part of the full canonical checkpoint tensor `name` this rank keeps (rows go at the
        destination's first row); the tensor itself when the rank keeps it whole."""
        ...

    def quantizer(self, spec) -> Quantizer | None:
        """The portable-tensor quantizer `quantize_model` must use for `spec` (a `QuantSpec`) on this
        rank, or None for the default round-to-nearest one."""
        ...

    def finish(self, model: nn.Module) -> CausalLM:
        """The loaded (and quantized) part, ready to be called like the single-device model."""
        ...


class WholeTensors:
    """For plans whose ranks keep every tensor they hold whole (pipeline stages, context parallel)."""

    def slice_for(self, name: str, tensor: Tensor) -> Tensor:
        return tensor

    def quantizer(self, spec) -> Quantizer | None:
        """Whole rows: the default quantizer gives the single-process values."""
        return None
