"""`random:<config name>`: a generated checkpoint of random weights for a named config (tests,
benchmarks), read through the same `load_weights` path as files.

Norms are 1, matrices normal(0, std). Each tensor is drawn from its own seed (the load seed and a
hash of its canonical name), so every parallel rank draws the same full tensors whichever part it
keeps, and a single-process model equals the one the ranks assemble. Tensors are drawn on the
target device: a CPU draw costs ~64 s per 8B parameters on 2 cores (`Tensor.normal_` of 50M fp32
values, timed), too slow to make GPU benchmarks of random 8B models wait for."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from fmstack.checkpoints.base import Checkpoint, TensorStream, expected_shapes
from fmstack.config import ModelConfig, named_config

PREFIX = "random:"


def detect(path: Path) -> bool:
    return str(path).startswith(PREFIX)


def random_checkpoint(config: ModelConfig, seed: int = 0, device: torch.device | str = "cpu",
                      std: float = 0.02) -> Checkpoint:
    """The random checkpoint of `config` (see the module docstring)."""
    shapes = expected_shapes(config)

    def tensors(names: set[str] | None = None) -> TensorStream:
        for name, shape in shapes.items():
            if names is not None and name not in names:
                continue
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, device=device)
            else:
                g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                yield name, torch.empty(shape, device=device).normal_(0.0, std, generator=g)

    return Checkpoint(path=Path(f"{PREFIX}{config.name}"), format="random", config=config, tensors=tensors)


def open_random(path: Path, seed: int = 0, device: torch.device | str = "cpu") -> Checkpoint:
    """`random:<config name>` (one of `fmstack.config.NAMED_CONFIGS`) -> its random checkpoint."""
    return random_checkpoint(named_config(str(path)[len(PREFIX):]), seed, device)
