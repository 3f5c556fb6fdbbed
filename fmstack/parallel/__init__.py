"""Multi-process inference under torchrun: tensor parallel (`tensor.py`), pipeline parallel
(`pipeline.py`) and context parallel (`ring.py`), applied to the single-device model from outside
by `fmstack.loading.load_model`; FSDP2 training (`fsdp.py`) beside them.

A plan (`plan.ParallelPlan`: `TensorParallel` / `PipelineParallel` / `ContextParallel`) builds this
rank's part of the model on the meta device and materializes only that, says which slice of each
checkpoint tensor the rank keeps, and finishes the model after loading and quantization."""

from __future__ import annotations

from fmstack.errors import ParameterError
from fmstack.parallel.dist import DistInfo
from fmstack.parallel.pipeline import PipelineParallel
from fmstack.parallel.plan import ParallelPlan
from fmstack.parallel.ring import ContextParallel
from fmstack.parallel.tensor import TensorParallel

MODES = ("none", "tp", "pp", "cp")


def make_plan(mode: str, info: DistInfo) -> ParallelPlan:
    plans = {"tp": TensorParallel, "pp": PipelineParallel, "cp": ContextParallel}
    if mode not in plans:
        raise ParameterError(f"--parallel {mode!r} is unknown; choose one of {', '.join(MODES)}")
    return plans[mode](info)
