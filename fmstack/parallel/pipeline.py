"""Pipeline parallelism: contiguous layers per rank (stage), hidden states passed rank to rank.

Stage r holds layers `chunk(n_layers, N, r)`; the first stage also the embedding, the last the final
norm and LM head (and, tied, the embedding weight the head shares). Everything else stays on the
meta device and is never read from the checkpoint. `PipelineModel` has the `Transformer` call
signature: every rank calls it with the same tokens, stage r receives `[B, T, dim]` from r-1
(`recv`), runs its layers and sends to r+1; the last stage's logits are broadcast so every rank
samples the same tokens.

Generation runs each call as one micro-batch (decode has nothing to overlap). `hidden_states`
(scoring) splits the batch into micro-batches that flow through the stages GPipe-style (forward
fill/drain: stage r works on micro-batch m while r+1 works on m-1), then broadcasts the final
normed hidden states from the last stage; `output` broadcasts the head's logits the same way.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fmstack.backends import mark_dynamic
from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.models.build import build_meta, materialize_meta
from fmstack.models.llama import (Transformer, layer_cache, rope_cos_sin, rope_inv_freq, scale_embeddings,
                                  scale_logits)
from fmstack.parallel.dist import DistInfo, fault_point
from fmstack.parallel.plan import WholeTensors, chunk

log = logging.getLogger(__name__)


class PipelineParallel(WholeTensors):
    """`ParallelPlan` for one rank: `build` its stage (layers on the meta device except its own; the
    tensors it holds are whole), `finish` it into a `PipelineModel` after loading (and quantizing)."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.rank, self.world = info.rank, info.world_size
        self.first, self.last = self.rank == 0, self.rank == self.world - 1

    def build(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
        if config.n_layers < self.world:
            raise ParameterError(f"--parallel pp: {self.world} stages need at least as many layers "
                                 f"(the model has {config.n_layers})")
        self.layers = chunk(config.n_layers, self.world, self.rank)
        model = build_meta(config, dtype)
        model.layers = nn.ModuleList(model.layers[i] for i in self.layers)  # blocks keep global indices
        held: list[nn.Module] = [model.layers]
        if self.first or (self.last and config.tie_embeddings):
            held.append(model.embed)
        if self.last:
            held += [model.norm, model.output]
        for m in held:
            materialize_meta(m, device)
        if self.last:
            model.tie_weights()
        log.info("pp stage %d/%d: layers %d..%d", self.rank, self.world, self.layers.start, self.layers.stop - 1)
        return model

    def finish(self, model: Transformer) -> "PipelineModel":
        return PipelineModel(model, self)


class StageKVCache(StaticKVCache):
    """A static cache for this stage's layers only, addressed by global layer index."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, layers: range, **kw):
        super().__init__(config, batch_size, max_seq_len, n_layers=len(layers), **kw)
        self.first_layer = layers.start

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        return super().layer_kv(layer - self.first_layer)


def _rows(cache, b0: int, b1: int):
    """The attention "cache" for batch rows [b0, b1): None stays None, a mask-only cache
    (eval's PackedMask, `mask [B, 1, T, T]`) is sliced."""
    return None if cache is None else type(cache)(cache.mask[b0:b1])


class LastStageHead(nn.Module):
    """The LM head: computed on the last stage, its logits broadcast to every rank. Input `[..., dim]`
    must be the same on every rank (as `PipelineModel.hidden_states` returns it)."""

    def __init__(self, proj: nn.Module | None, vocab_size: int, dim: int, src: int):
        super().__init__()
        self.proj, self.vocab_size, self.src = proj, vocab_size, src
        # Scoring reads `output.weight.shape[0]`; other stages hold no weight, only its shape.
        self._shape = torch.Size((vocab_size, dim))

    @property
    def weight(self) -> Tensor:
        return self.proj.weight if self.proj is not None else torch.empty(self._shape, device="meta")

    @torch.compiler.disable
    def forward(self, h: Tensor) -> Tensor:
        if self.proj is not None:
            logits = self.proj(h).contiguous()
        else:
            logits = h.new_empty(*h.shape[:-1], self.vocab_size)
        dist.broadcast(logits, src=self.src)
        return logits


class PipelineModel(nn.Module):
    """One pipeline stage as a `StagedCausalLM` (`forward`, `hidden_states`, `output`, `config`,
    `make_cache` for a stage-local KV cache, `compile_stage`), plus `layers` (this stage's)."""

    compiles_whole = False  # send/recv/broadcast between stages cannot be traced

    def __init__(self, stage: Transformer, plan: PipelineParallel, micro_batches: int | None = None):
        super().__init__()
        self.config, self.plan = stage.config, plan
        self.first, self.last, self.rank = plan.first, plan.last, plan.rank
        self.src = plan.world - 1  # the last stage
        self.embed = stage.embed if plan.first else None
        self.layers = stage.layers
        self.norm = stage.norm if plan.last else None
        self.output = LastStageHead(stage.output if plan.last else None, self.config.vocab_size,
                                    self.config.dim, self.src)
        self.dtype = stage.norm.weight.dtype  # activations (also with quantized projections)
        self.micro_batches = micro_batches or 2 * plan.world
        self._run_layers, self._compiled = self._layers, False

    def make_cache(self, batch_size: int, max_seq_len: int, static=None, **kw) -> StageKVCache:
        """A static cache for this stage's layers only (`static` is not needed: always a StageKVCache)."""
        return StageKVCache(self.config, batch_size, max_seq_len, self.plan.layers, **kw)

    def compile_stage(self) -> None:
        """torch.compile this stage's layers (send/recv/broadcast stay eager: they cannot be traced)."""
        self._run_layers, self._compiled = torch.compile(self._layers, fullgraph=True), True

    def _layers(self, x: Tensor, positions: Tensor, cache) -> Tensor:
        cos, sin = rope_cos_sin(rope_inv_freq(self.config, device=x.device), positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, positions, layer_cache(cache, block.attn.layer))
        return self.norm(x) if self.last else x

    def _device(self) -> torch.device:
        return self.layers[0].attn_norm.weight.device

    def _stage_input(self, tokens: Tensor, positions: Tensor) -> Tensor:
        if self.first:
            x = scale_embeddings(self.embed(tokens), self.config)
        else:
            x = torch.empty(*tokens.shape, self.config.dim, dtype=self.dtype, device=self._device())
            dist.recv(x, src=self.rank - 1)
        if self._compiled and tokens.shape[1] > 1:  # one prefill graph for all lengths (decode: static)
            mark_dynamic(x, 1)
            mark_dynamic(positions, 1)
        return x

    @torch.compiler.disable
    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache=None,
                last_only: bool = False) -> Tensor:
        """tokens `[B, T]` (the same on every rank) -> logits `[B, T, V]` (`[B, 1, V]` with
        last_only) on every rank."""
        fault_point("forward")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        x = self._run_layers(self._stage_input(tokens, positions), positions, cache)
        if self.last:
            logits = scale_logits(self.output.proj(x[:, -1:] if last_only else x), self.config).contiguous()
        else:
            dist.send(x.contiguous(), dst=self.rank + 1)
            B, T = tokens.shape
            logits = x.new_empty(B, 1 if last_only else T, self.config.vocab_size)
        dist.broadcast(logits, src=self.src)
        return logits

    @torch.compiler.disable
    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, cache=None) -> Tensor:
        """tokens `[B, T]` -> final normed hidden states `[B, T, dim]` on every rank, the batch run as
        micro-batches (GPipe fill/drain). `cache`: None or a mask-only cache (see `_rows`)."""
        fault_point("forward")
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, -1)
        sends, outs = [], []
        n = min(self.micro_batches, B)
        for i in range(n):
            r = chunk(B, n, i)
            pos = positions[r.start:r.stop]
            x = self._run_layers(self._stage_input(tokens[r.start:r.stop], pos), pos, _rows(cache, r.start, r.stop))
            if self.last:
                outs.append(x)
            else:  # async: compute the next micro-batch while this one travels
                x = x.contiguous()
                sends.append((dist.isend(x, dst=self.rank + 1), x))
        for work, _ in sends:
            work.wait()
        h = torch.cat(outs) if self.last else torch.empty(B, T, self.config.dim, dtype=self.dtype,
                                                            device=self._device())
        dist.broadcast(h, src=self.src)
        return h
