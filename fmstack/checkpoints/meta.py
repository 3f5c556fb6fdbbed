"""Meta checkpoints: `params.json` + `consolidated.NN.pth` (one file per model-parallel rank).

Shards are memory-mapped; each canonical tensor is merged across shards (concatenated along the
dim the shards split, or taken once when replicated) and q/k rows are permuted from Meta's
interleaved RoPE layout to rotate-half, one tensor at a time."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from fmstack.checkpoints.base import Checkpoint, TensorStream, expected_shapes
from fmstack.checkpoints.torchfile import UnsafePickleError, load_torch_file
from fmstack.config import from_meta_params, read_json
from fmstack.errors import CheckpointError

log = logging.getLogger(__name__)


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """q/k weight `[n_heads*D, dim]` with interleaved RoPE pairs -> rotate-half row order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of `interleaved_to_half` (what Meta/llama.cpp layouts store)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("consolidated.*.pth"))


def detect(path: Path) -> bool:
    return path.is_dir() and ((path / "params.json").exists() or bool(_shards(path)))


def _load(file: Path) -> dict[str, Tensor]:
    """Memory-mapped state dict of one shard (no tensor data read yet). Refuses unsafe pickles
    (see `torchfile`) in both torch.save formats; the legacy format cannot be memory-mapped."""
    if not zipfile.is_zipfile(file):  # truncation loses the zip's central directory at the end
        try:  # only to tell an unsafe pickle apart: this reads a legacy file whole (an error path)
            load_torch_file(file)
        except UnsafePickleError:
            raise
        except CheckpointError:
            pass
        raise CheckpointError(f"{file}: not a zip-format PyTorch checkpoint (truncated, corrupt, or saved "
                              "with the legacy torch.save format, which cannot be memory-mapped)")
    return load_torch_file(file, mmap=True)


def _merge(name: str, parts: list[Tensor], expected: tuple[int, ...] | None, file: Path) -> Tensor:
    """Join one tensor's shard pieces: the one dim whose size differs from `expected` is concatenated."""
    if len(parts) == 1:
        return parts[0]
    shape = tuple(parts[0].shape)
    if expected is None or shape == expected:
        return parts[0]  # replicated (norms) or unknown
    split = [d for d in range(len(shape)) if shape[d] != expected[d]]
    if len(split) == 1 and all(p.shape == parts[0].shape for p in parts):
        merged = torch.cat(parts, dim=split[0])
        if tuple(merged.shape) == expected:
            return merged
    found = [tuple(p.shape) for p in parts]
    raise CheckpointError(f"{file.parent}: tensor {name} shards have shapes {found}, "
                          f"which do not merge into the expected {expected}")


def _tokenizer(path: Path) -> Path | None:
    for d in (path, path.parent):
        if (d / "tokenizer.model").exists():
            return d / "tokenizer.model"
    return None


def open_meta(path: Path) -> Checkpoint:
    """Read params.json (vocab size from the embedding if params say -1), return a streaming Checkpoint."""
    if not (path / "params.json").exists():
        raise CheckpointError(f"{path}: params.json not found (a Meta checkpoint needs it next to the weights)")
    files = _shards(path)
    if not files:
        raise CheckpointError(f"{path}: no consolidated.*.pth files")
    params = read_json(path / "params.json")
    sds = [_load(f) for f in files]
    emb = sds[0].get("tok_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{files[0]}: tensor tok_embeddings.weight not found")
    dim = params.get("dim")
    # Llama-2 splits the embedding along dim 1 (ParallelEmbedding), Llama-3 along the vocab (dim 0).
    vocab = emb.shape[0] if emb.shape[1] != dim else sum(sd["tok_embeddings.weight"].shape[0] for sd in sds)
    config = from_meta_params(params, vocab_size=vocab, source=str(path / "params.json"))
    shapes = expected_shapes(config)
    del sds, emb

    def tensors(names: set[str] | None = None) -> TensorStream:
        sds = [_load(f) for f in files]
        for name in sds[0]:
            if name == "rope.freqs" or (names is not None and name not in names):
                continue
            try:
                parts = [sd[name] for sd in sds]
            except KeyError:
                raise CheckpointError(f"{path}: tensor {name} is missing from some shards") from None
            w = _merge(name, parts, shapes.get(name), files[0])
            if name.endswith(("attention.wq.weight", "attention.wk.weight")) and w.dim() == 2:
                heads = config.n_heads if name.endswith("wq.weight") else config.n_kv_heads
                if w.shape[0] % (2 * heads) == 0:  # else load_weights reports the shape mismatch
                    w = interleaved_to_half(w, heads)
            yield name, w
            del parts, w

    return Checkpoint(path=path, format="meta", config=config, tensors=tensors, tokenizer_path=_tokenizer(path),
                      metadata={"params": params})
