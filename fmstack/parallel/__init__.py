"""Multi-process inference under torchrun: tensor parallel (`tensor.py`) and pipeline parallel
(`pipeline.py`), applied to the single-device model from outside by `fmstack.loading.load_model`.

A plan (`TensorParallel` / `PipelineParallel`) builds this rank's part of the model on the meta
device and materializes only that, says which slice of each checkpoint tensor the rank keeps, and
finishes the model after loading and quantization."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from fmstack.checkpoints.base import Checkpoint, TensorStream, expected_shapes
from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.parallel.dist import DistInfo

MODES = ("none", "tp", "pp", "cp")


def make_plan(mode: str, info: DistInfo):
    from fmstack.parallel.pipeline import PipelineParallel
    from fmstack.parallel.tensor import TensorParallel

    if mode == "tp":
        return TensorParallel(info)
    if mode == "pp":
        return PipelineParallel(info)
    if mode == "cp":
        from fmstack.parallel.ring import ContextParallel

        return ContextParallel(info)
    raise ParameterError(f"--parallel {mode!r} is unknown; choose one of {', '.join(MODES)}")


def random_checkpoint(config: ModelConfig, seed: int = 0, std: float = 0.02) -> Checkpoint:
    """Random canonical tensors (norms 1, matrices normal(0, std)), each from its own seed, so every
    rank draws the same full tensors whichever part it keeps."""
    shapes = expected_shapes(config)

    def tensors(names: set[str] | None = None) -> TensorStream:
        for name, shape in shapes.items():
            if names is not None and name not in names:
                continue
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                yield name, torch.empty(shape).normal_(0.0, std, generator=g)

    return Checkpoint(path=Path(f"random:{config.name}"), format="random", config=config, tensors=tensors)
