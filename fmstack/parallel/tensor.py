"""Tensor parallelism (Megatron-style), applied from outside to a meta-built `Transformer`.

Per block, each rank holds some attention heads and a slice of the MLP:
  wqkv       column-split: this rank's q rows, k rows, v rows            (no communication)
  wo         row-split (this rank's input columns), then all-reduce       [B, T, dim]
  w_gate_up  column-split: this rank's gate rows and up rows             (no communication)
  w_down     row-split, then all-reduce                                   [B, T, dim]
A MoE block (`fmstack.models.moe`) splits every expert the same way: each rank holds all E experts'
gate/up rows and down columns of its slice of F (`w_gate_up` `[E, 2F/N, dim]`, `w_down` `[E, dim, F/N]`)
and the full router, so every rank routes each token alike and one all-reduce sums the partial outputs.
The embedding and LM head are vocabulary-parallel: each rank holds ceil(V/N) rows (the last rank's
tail is zero padding); the embedding masks ids outside its rows and all-reduces, the head computes
its logits slice and all-gathers, so every rank gets identical full `[B, T, V]` logits.

Heads with GQA: when the ranks are no more than the kv heads, kv heads (with their q groups) are
split across ranks, unevenly when they do not divide (e.g. 3 kv heads on 2 ranks: 2 + 1); when
there are more ranks than kv heads, each kv head is replicated on the ranks that share its q heads.
Collectives are `torch.distributed._functional_collectives`, which torch.compile traces into the graph.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.models.build import materialize_meta
from fmstack.models.llama import Attention, FeedForward, Transformer
from fmstack.models.moe import MoEFeedForward
from fmstack.parallel.dist import DistInfo, fault_point
from fmstack.parallel.plan import Quantizer, chunk
from fmstack.quant import QuantSpec, rtn_portable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadShard:
    q: range  # global q heads of this rank
    kv: range  # global kv heads those q heads use


def head_shard(n_heads: int, n_kv_heads: int, world: int, rank: int) -> HeadShard:
    group = n_heads // n_kv_heads
    if world <= n_kv_heads:
        kv = chunk(n_kv_heads, world, rank)
        return HeadShard(range(kv.start * group, kv.stop * group), kv)
    # More ranks than kv heads: kv head j is shared by the ranks chunk(world, n_kv_heads, j).
    j = next(j for j in range(n_kv_heads) if rank in chunk(world, n_kv_heads, j))
    sharers = chunk(world, n_kv_heads, j)
    if len(sharers) > group:
        raise ParameterError(f"--parallel tp: {world} ranks cannot split {n_heads} attention heads "
                             f"({n_kv_heads} kv heads); use at most {n_heads} ranks")
    q = chunk(group, len(sharers), rank - sharers.start)
    return HeadShard(range(j * group + q.start, j * group + q.stop), range(j, j + 1))


def all_reduce(x: Tensor, group) -> Tensor:
    return funcol.all_reduce(x, "sum", group)


# torch 2.13 deprecates all_gather_tensor for all_gather_single (same arguments); older ones lack it.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class ParallelAttention(Attention):
    """Attention over this rank's heads; wo's partial outputs are summed across ranks."""

    def __init__(self, config: ModelConfig, layer: int, shard: HeadShard, group):
        local = config.replace(n_heads=len(shard.q), n_kv_heads=len(shard.kv), head_dim=config.head_dim)
        super().__init__(local, layer)
        self.shard, self.group = shard, group

    def forward(self, *args) -> Tensor:
        return all_reduce(super().forward(*args), self.group)


class _HiddenSlice:
    """Mixin for an FFN class: built over this rank's slice `rows` of the hidden units (ffn_dim), the
    partial outputs summed across ranks."""

    def __init__(self, config: ModelConfig, rows: range, group):
        super().__init__(config.replace(ffn_dim=len(rows)))
        self.rows, self.group = rows, group

    def forward(self, x: Tensor) -> Tensor:
        return all_reduce(super().forward(x), self.group)


class ParallelFeedForward(_HiddenSlice, FeedForward):
    """SwiGLU over this rank's slice of the hidden units; w_down's partial outputs are summed."""


class ParallelMoEFeedForward(_HiddenSlice, MoEFeedForward):
    """MoE FFN over this rank's slice of every expert's hidden units (full router); outputs summed."""


_EXPERT = re.compile(r"^feed_forward\.experts\.\d+\.")  # expert e's w1/w2/w3: sliced like the dense ones


class VocabParallelEmbedding(nn.Module):
    """Rows `[start, start + n)` of the embedding (weight `[n_padded, dim]`); ids outside give zeros,
    and the all-reduce sums in the one rank that holds each id."""

    def __init__(self, rows: range, n_padded: int, dim: int, group):
        super().__init__()
        self.start, self.stop, self.group = rows.start, rows.stop, group
        self.weight = nn.Parameter(torch.empty(n_padded, dim))

    def forward(self, tokens: Tensor) -> Tensor:
        inside = (tokens >= self.start) & (tokens < self.stop)
        local = torch.where(inside, tokens - self.start, 0)
        x = F.embedding(local, self.weight) * inside[..., None].to(self.weight.dtype)
        return all_reduce(x, self.group)


class VocabParallelHead(nn.Module):
    """LM head over this rank's vocabulary rows (`proj`: a Linear or a quantized module with
    `[n_padded, dim]` weights); all-gathers the slices to full logits `[..., V]` on every rank."""

    def __init__(self, proj: nn.Module, vocab_size: int, group):
        super().__init__()
        self.proj, self.vocab_size, self.group = proj, vocab_size, group

    @property
    def weight(self) -> Tensor:
        return self.proj.weight

    def forward(self, h: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            fault_point("forward")
        local = self.proj(h)
        full = _all_gather(local.contiguous(), local.dim() - 1, self.group)
        return full[..., :self.vocab_size]


class TensorParallel:
    """`ParallelPlan` for one rank: `build` the sharded model, `slice_for` its part of each checkpoint
    tensor, `quantizer` with whole-row int8 scales, `finish` it after loading (and quantizing)."""

    def __init__(self, info: DistInfo, group=None):
        self.info = info
        self.group = group if group is not None else dist.group.WORLD

    def build(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
        world, rank = self.info.world_size, self.info.rank
        self.heads = head_shard(config.n_heads, config.n_kv_heads, world, rank)
        if config.ffn_dim < world:
            raise ParameterError(f"--parallel tp: ffn_dim {config.ffn_dim} is smaller than {world} ranks")
        self.ffn = chunk(config.ffn_dim, world, rank)
        self.vocab_rows = -(-config.vocab_size // world)
        start = min(rank * self.vocab_rows, config.vocab_size)
        self.vocab = range(start, min(start + self.vocab_rows, config.vocab_size))
        log.info("tp rank %d/%d: q heads %d..%d, kv heads %d..%d, ffn rows %d..%d, vocab rows %d..%d", rank, world,
                 self.heads.q.start, self.heads.q.stop - 1, self.heads.kv.start, self.heads.kv.stop - 1,
                 self.ffn.start, self.ffn.stop - 1, self.vocab.start, self.vocab.stop - 1)
        D, q, kv = config.head_dim, self.heads.q, self.heads.kv
        # canonical tensor (name within a layer) -> (dim to slice, this rank's indices along it)
        self._slices = {
            "attention.wq.weight": (0, range(q.start * D, q.stop * D)),
            "attention.wk.weight": (0, range(kv.start * D, kv.stop * D)),
            "attention.wv.weight": (0, range(kv.start * D, kv.stop * D)),
            "attention.wq.bias": (0, range(q.start * D, q.stop * D)),
            "attention.wk.bias": (0, range(kv.start * D, kv.stop * D)),
            "attention.wv.bias": (0, range(kv.start * D, kv.stop * D)),
            "attention.wo.weight": (1, range(q.start * D, q.stop * D)),
            "feed_forward.w1.weight": (0, self.ffn),
            "feed_forward.w3.weight": (0, self.ffn),
            "feed_forward.w2.weight": (1, self.ffn),
            "tok_embeddings.weight": (0, self.vocab),
            "output.weight": (0, self.vocab),
        }
        with torch.device("meta"):
            model = Transformer(config)
            model.embed = VocabParallelEmbedding(self.vocab, self.vocab_rows, config.dim, self.group)
            model.output = nn.Linear(config.dim, self.vocab_rows, bias=False)
            for block in model.layers:
                block.attn = ParallelAttention(config, block.attn.layer, self.heads, self.group)
                mlp = ParallelMoEFeedForward if config.n_experts else ParallelFeedForward
                block.mlp = mlp(config, self.ffn, self.group)
        model = model.to(dtype)
        materialize_meta(model, device)
        model.tie_weights()
        return model

    def slice_for(self, name: str, tensor: Tensor) -> Tensor:
        """This rank's part of the full canonical tensor `name` (vocab slices zero-padded to ceil(V/N) rows)."""
        key = name.split(".", 2)[2] if name.startswith("layers.") else name
        key = _EXPERT.sub("feed_forward.", key)
        if key not in self._slices:
            return tensor  # norms: replicated
        dim, r = self._slices[key]
        part = tensor.narrow(dim, r.start, len(r))
        if key in ("tok_embeddings.weight", "output.weight") and len(r) < self.vocab_rows:
            part = F.pad(part, (0, 0, 0, self.vocab_rows - len(r)))
        return part

    def quantizer(self, spec: QuantSpec) -> Quantizer | None:
        """Quantizer for `quantize_model`: int8 scales of the row-parallel projections (wo, w_down)
        use the absmax of the whole row (all-reduced), so every rank's int8 values are exactly the
        single-process ones. Other projections hold whole rows already. int4 groups are cut within a
        rank's columns (the single-process groups when its first column is a multiple of the group
        size, as with head_dim 64 and groups up to 64). None: the default quantizer."""
        if spec.bits != 8:
            return None
        def portable(name: str, w: Tensor) -> dict[str, Tensor]:
            if not name.endswith((".attn.wo", ".mlp.w_down")):
                return rtn_portable(w, spec)
            amax = w.float().abs().amax(dim=-1)  # [N], or [E, N] for stacked experts
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
            scales = (amax / 127.0).clamp_min(1e-12)
            q = torch.round(w.float() / scales[..., None]).clamp(-127, 127).to(torch.int8)
            return {"qweight": q, "scales": scales}
        return portable

    def finish(self, model: Transformer) -> Transformer:
        """Wrap the (possibly quantized) local LM head so it returns full logits."""
        model.output = VocabParallelHead(model.output, model.config.vocab_size, self.group)
        return model
