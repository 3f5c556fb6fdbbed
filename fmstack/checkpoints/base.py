"""What every checkpoint reader yields, the reader registry, and the one place that streams
tensors into a model.

Readers yield `(canonical_name, tensor)` pairs one at a time, in any order. Canonical names are
Meta-style per-projection names with q/k rows in HF's rotate-half layout (the layout
`fmstack.models.llama` uses):

    tok_embeddings.weight                      [V, dim]
    layers.{i}.attention_norm.weight           [dim]
    layers.{i}.attention.wq.weight             [H*D, dim]
    layers.{i}.attention.wk.weight             [Hkv*D, dim]
    layers.{i}.attention.wv.weight             [Hkv*D, dim]
    layers.{i}.attention.wo.weight             [dim, H*D]
    layers.{i}.ffn_norm.weight                 [dim]
    layers.{i}.feed_forward.w1.weight          [F, dim]   (gate)
    layers.{i}.feed_forward.w3.weight          [F, dim]   (up)
    layers.{i}.feed_forward.w2.weight          [dim, F]   (down)
    norm.weight                                [dim]
    output.weight                              [V, dim]   (absent when tied)

A MoE config (`n_experts` > 0) has, instead of the three feed_forward projections, a router and
per-expert projections (Mixtral's names), loaded into the stacked expert weights as they arrive:

    layers.{i}.feed_forward.gate.weight            [E, dim]
    layers.{i}.feed_forward.experts.{e}.w1.weight  [F, dim]   (w3 likewise; w2 [dim, F])

Family extras, present only when the config has them: `layers.{i}.attention.w{q,k,v}.bias`
`[H*D]`/`[Hkv*D]` (qkv_bias, Qwen2) and `layers.{i}.attention.{q,k}_norm.weight` `[D]` (qk_norm, Qwen3).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fmstack.config import ModelConfig
from fmstack.errors import CheckpointError
from fmstack.quant import QuantSpec
from fmstack.quant.blocks import BlockWeight

log = logging.getLogger(__name__)

TensorStream = Iterator[tuple[str, Tensor]]


@dataclass
class Checkpoint:
    """An opened checkpoint: its config, where its tokenizer lives, and a tensor stream factory.

    `tensors(names)` streams canonical float tensors; with `names` given, a reader may skip the
    others without reading them (pipeline/tensor parallel ranks load only what they hold).
    A quantized checkpoint (fmstack's own) also has `quant`, its scheme, and `quant_tensors(module)`,
    the portable tensors (`qweight`, `scales`, `zeros`) of one quantized projection.
    `block_tensor(name)` (GGUF): the canonical matrix `name` as a `fmstack.quant.blocks.BlockWeight`
    holding the file's own blocks, or None where its type is not kept as blocks (float types).
    `metadata` is the format's own header as read, for callers that need a raw field: GGUF key/values
    (the tokenizer arrays included), `{"config": config.json}` (HF, fmstack), `{"params": params.json}` (Meta).
    """

    path: Path
    format: str
    config: ModelConfig
    tensors: Callable[[set[str] | None], TensorStream]
    tokenizer_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    quant: QuantSpec | None = None
    quant_tensors: Callable[[str], dict[str, Tensor]] | None = None
    block_tensor: Callable[[str], BlockWeight | None] | None = None


@dataclass(frozen=True)
class Reader:
    """`detect(path)` says whether `open(path)` reads it. A generated reader (`random:<config>`) also
    takes the seed of its draw and the device to draw on: `open(path, seed=..., device=...)`."""

    detect: Callable[[Path], bool]
    open: Callable[..., Checkpoint]
    generated: bool = False


_READERS: dict[str, Reader] = {}


def register_reader(name: str, detect: Callable[[Path], bool], open_fn: Callable[..., Checkpoint],
                    generated: bool = False) -> None:
    _READERS[name] = Reader(detect, open_fn, generated)


def is_generated(spec: str | Path) -> bool:
    """Whether `spec` names a generated checkpoint (`random:<config>`) rather than a file or directory."""
    return any(r.generated and r.detect(Path(spec)) for r in _READERS.values())


def open_checkpoint(path: str | Path, seed: int = 0, device: torch.device | str = "cpu") -> Checkpoint:
    """Open a checkpoint file or directory (or a generated one: `random:<config>`) with the first
    reader that recognises it. `seed`, `device`: the draw of generated checkpoints (files ignore them)."""
    path = Path(path).expanduser()
    for name, reader in _READERS.items():
        if reader.detect(path):
            log.debug("opening %s as %s", path, name)
            return reader.open(path, seed=seed, device=device) if reader.generated else reader.open(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(
        f"{path}: not a recognised checkpoint (expected a .gguf file, a HF directory with config.json and "
        "model.safetensors[.index.json], or a Meta directory with params.json and consolidated.*.pth)"
    )


_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def rename_tensor(name: str, global_names: dict[str, str], layer_re: re.Pattern,
                  layer_names: dict[str, str]) -> str | None:
    """Map a format's tensor name to the canonical one: whole-model names through `global_names`,
    per-layer names by `layer_re` (groups: layer index, suffix) and `layer_names` (suffix -> canonical)."""
    if name in global_names:
        return global_names[name]
    if name.endswith(".bias"):  # a bias maps like its weight (layer_re matches `.weight` names)
        canon = rename_tensor(name[:-len("bias")] + "weight", {}, layer_re, layer_names)
        return None if canon is None else canon[:-len("weight")] + "bias"
    m = layer_re.match(name)
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.weight"
    return None


def float_targets(model: nn.Module) -> dict[str, tuple[Tensor, int, tuple[int, ...]]]:
    """Canonical name -> (destination parameter, first row, canonical shape) for the float weights of
    a `fmstack.models.llama.Transformer`. Projections already replaced by quantized modules are left out.
    Layer names use each block's own (global) index, so a pipeline stage holding some layers maps right."""
    cfg: ModelConfig = model.config
    shapes = expected_shapes(cfg)
    out: dict[str, tuple[Tensor, int]] = {
        "norm.weight": (model.norm.weight, 0),
    }
    if hasattr(model.embed, "weight"):  # a float embedding (a GGUF block one holds qweight/scales)
        out["tok_embeddings.weight"] = (model.embed.weight, 0)
    if not cfg.tie_embeddings and isinstance(model.output, nn.Linear):
        out["output.weight"] = (model.output.weight, 0)
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        p = f"layers.{attn.layer}."
        q_rows = attn.n_heads * attn.head_dim
        kv_rows = attn.n_kv_heads * attn.head_dim
        out[p + "attention_norm.weight"] = (block.attn_norm.weight, 0)
        out[p + "ffn_norm.weight"] = (block.mlp_norm.weight, 0)
        if isinstance(attn.wqkv, nn.Linear):
            out[p + "attention.wq.weight"] = (attn.wqkv.weight, 0)
            out[p + "attention.wk.weight"] = (attn.wqkv.weight, q_rows)
            out[p + "attention.wv.weight"] = (attn.wqkv.weight, q_rows + kv_rows)
        if attn.qkv_bias is not None:
            out[p + "attention.wq.bias"] = (attn.qkv_bias, 0)
            out[p + "attention.wk.bias"] = (attn.qkv_bias, q_rows)
            out[p + "attention.wv.bias"] = (attn.qkv_bias, q_rows + kv_rows)
        if attn.q_norm is not None:
            out[p + "attention.q_norm.weight"] = (attn.q_norm.weight, 0)
            out[p + "attention.k_norm.weight"] = (attn.k_norm.weight, 0)
        if isinstance(attn.wo, nn.Linear):
            out[p + "attention.wo.weight"] = (attn.wo.weight, 0)
        if cfg.n_experts:
            out.update(_expert_targets(mlp, p))
        elif isinstance(mlp.w_gate_up, nn.Linear):
            out[p + "feed_forward.w1.weight"] = (mlp.w_gate_up.weight, 0)
            out[p + "feed_forward.w3.weight"] = (mlp.w_gate_up.weight, mlp.ffn_dim)
        if isinstance(mlp.w_down, nn.Linear):
            out[p + "feed_forward.w2.weight"] = (mlp.w_down.weight, 0)
    return {name: (dest, row, shapes[name]) for name, (dest, row) in out.items()}


def _expert_targets(mlp: nn.Module, prefix: str) -> dict[str, tuple[Tensor, int]]:
    """Router and per-expert destinations of a MoE FFN: expert e's w1/w3 are rows of `w_gate_up.weight[e]`,
    its w2 is `w_down.weight[e]` (int8 experts, which are not float, are left out)."""
    out = {prefix + "feed_forward.gate.weight": (mlp.gate.weight, 0)}
    for e in range(mlp.n_experts):
        q = f"{prefix}feed_forward.experts.{e}."
        if mlp.w_gate_up.weight.is_floating_point():
            out[q + "w1.weight"] = (mlp.w_gate_up.weight[e], 0)
            out[q + "w3.weight"] = (mlp.w_gate_up.weight[e], mlp.ffn_dim)
        if mlp.w_down.weight.is_floating_point():
            out[q + "w2.weight"] = (mlp.w_down.weight[e], 0)
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape, for readers that validate before reading."""
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (config.vocab_size, config.dim),
        "norm.weight": (config.dim,),
    }
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, config.dim)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (config.dim,),
            p + "ffn_norm.weight": (config.dim,),
            p + "attention.wq.weight": (config.q_dim, config.dim),
            p + "attention.wk.weight": (config.kv_dim, config.dim),
            p + "attention.wv.weight": (config.kv_dim, config.dim),
            p + "attention.wo.weight": (config.dim, config.q_dim),
        })
        ffn = [f"feed_forward.experts.{e}." for e in range(config.n_experts)] or ["feed_forward."]
        for q in ffn:
            shapes.update({p + q + "w1.weight": (config.ffn_dim, config.dim),
                           p + q + "w3.weight": (config.ffn_dim, config.dim),
                           p + q + "w2.weight": (config.dim, config.ffn_dim)})
        if config.n_experts:
            shapes[p + "feed_forward.gate.weight"] = (config.n_experts, config.dim)
        if config.qkv_bias:
            shapes.update({p + "attention.wq.bias": (config.q_dim,), p + "attention.wk.bias": (config.kv_dim,),
                           p + "attention.wv.bias": (config.kv_dim,)})
        if config.qk_norm:
            shapes.update({p + "attention.q_norm.weight": (config.head_dim,),
                           p + "attention.k_norm.weight": (config.head_dim,)})
    return shapes


@contextlib.contextmanager
def one_intraop_thread():
    """Run torch's CPU ops on one intra-op thread, then restore the count. Streaming weights is
    memory-bound, and on a busy machine OpenMP's barrier waits for a descheduled second thread:
    on the shared 2-core machine (load average ~9) dequantizing the default model's Q4_1 tensors
    took 15 s with 2 threads and 1.0 s with one; copying them into the model 6 s and 0.3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def load_weights(model: nn.Module, checkpoint: Checkpoint,
                 slice_for: Callable[[str, Tensor], Tensor] | None = None) -> None:
    """Stream the checkpoint's tensors into `model` (already materialized), casting to each
    parameter's dtype/device; one source tensor alive at a time. Raises CheckpointError on a
    shape mismatch (name, expected, found), an unknown tensor, or missing tensors.

    Parallel ranks: parameters left on the meta device are not this rank's and are not read, and
    `slice_for(name, full_tensor)` returns the part of a canonical tensor this rank keeps (its rows
    go at the destination's first row)."""
    targets = {n: t for n, t in float_targets(model).items() if not t[0].is_meta}
    with one_intraop_thread():
        seen = _stream_into(targets, model.config, checkpoint, slice_for)
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{checkpoint.path}: missing tensors {', '.join(missing[:3])}{more}")


def _stream_into(targets: dict[str, tuple[Tensor, int, tuple[int, ...]]], config: ModelConfig,
                 checkpoint: Checkpoint, slice_for: Callable[[str, Tensor], Tensor] | None) -> set[str]:
    """The loop of `load_weights`: copy each streamed tensor into its target; the names copied."""
    seen: set[str] = set()
    for name, tensor in checkpoint.tensors(set(targets)):
        if name == "output.weight" and config.tie_embeddings:
            continue  # some tied checkpoints still store a copy
        if name not in targets:
            if _LAYER_RE.match(name) and int(_LAYER_RE.match(name).group(1)) >= config.n_layers:
                raise CheckpointError(f"{checkpoint.path}: tensor {name} is beyond n_layers={config.n_layers}")
            log.debug("skipping tensor %s not used by the model", name)
            continue
        dest, row, expected = targets[name]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{checkpoint.path}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected}"
            )
        part = slice_for(name, tensor) if slice_for is not None else tensor
        dest[row:row + part.shape[0]].copy_(part)
        seen.add(name)
        del tensor, part
    return seen
