"""HF checkpoints: a directory with `config.json` and `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Tensors are streamed one at a time from memory-mapped files;
HF q/k rows are already in rotate-half layout, so only names change."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from fmstack.checkpoints.base import rename_tensor, Checkpoint, TensorStream, expected_shapes
from fmstack.config import from_hf_config, read_json
from fmstack.errors import CheckpointError

log = logging.getLogger(__name__)

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"

_GLOBAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "block_sparse_moe.gate": "feed_forward.gate",  # Mixtral router
    "self_attn.q_norm": "attention.q_norm",  # Qwen3
    "self_attn.k_norm": "attention.k_norm",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_EXPERT_RE = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])$")  # Mixtral expert e's w1/w2/w3


def hf_name_to_canonical(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attention.wq.weight` (`.bias` likewise);
    None when the tensor has no canonical counterpart (e.g. `rotary_emb.inv_freq`). Mixtral's
    `block_sparse_moe.experts.E.w1` keeps its name: `layers.3.feed_forward.experts.E.w1.weight`."""
    m = _LAYER_RE.match(name)
    expert = _EXPERT_RE.match(m.group(2)) if m else None
    if expert:
        return f"layers.{m.group(1)}.feed_forward.experts.{expert.group(1)}.{expert.group(2)}.weight"
    return rename_tensor(name, _GLOBAL, _LAYER_RE, _LAYER)


def detect(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in (SINGLE, INDEX, "config.json"))


def _safe_open(file: Path) -> Any:
    """safe_open with low-level errors (truncated file, bad header) turned into CheckpointError."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: safetensors file not found") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file (truncated or corrupt: {e})") from None


def _shard_map(path: Path) -> dict[Path, list[str]]:
    """File -> HF tensor names it holds, from the index (sharded) or the single file's header."""
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: not a valid safetensors index ({e!r})") from None
        files: dict[Path, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(path / fname, []).append(name)
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{path / INDEX}: lists {f.name}, which does not exist")
        return files
    if (path / SINGLE).exists():
        with _safe_open(path / SINGLE) as f:
            return {path / SINGLE: list(f.keys())}
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} (only safetensors HF checkpoints are supported)")


def open_hf(path: Path) -> Checkpoint:
    """Read config.json, check every shard's header (names and shapes), return a streaming Checkpoint."""
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: config.json not found (a HF checkpoint needs it next to the weights)")
    data = read_json(path / "config.json")
    config = from_hf_config(data, source=str(path / "config.json"))
    files = _shard_map(path)
    shapes = expected_shapes(config)
    for file, names in files.items():
        with _safe_open(file) as f:
            keys = set(f.keys())
            for name in names:
                if name not in keys:
                    raise CheckpointError(f"{file}: tensor {name} listed in the index is missing")
                canon = hf_name_to_canonical(name)
                found = tuple(f.get_slice(name).get_shape())
                if canon in shapes and found != shapes[canon]:
                    raise CheckpointError(f"{file}: tensor {canon} ({name}) has shape {found}, "
                                          f"expected {shapes[canon]}")

    def tensors(names: set[str] | None = None) -> TensorStream:
        for file, hf_names in files.items():
            wanted = []
            for n in hf_names:
                canon = hf_name_to_canonical(n)
                if canon is None:
                    if "rotary_emb" not in n:
                        log.warning("%s: ignoring tensor %s (not part of a LLaMA model)", file.name, n)
                elif names is None or canon in names:
                    wanted.append((n, canon))
            if not wanted:
                continue
            with _safe_open(file) as f:
                for n, canon in wanted:
                    try:
                        t = f.get_tensor(n)
                    except (SafetensorError, OSError, RuntimeError) as e:
                        raise CheckpointError(f"{file}: cannot read tensor {n} ({e})") from None
                    yield canon, t

    return Checkpoint(path=path, format="hf", config=config, tensors=tensors, tokenizer_path=path,
                      metadata={"config": data})
