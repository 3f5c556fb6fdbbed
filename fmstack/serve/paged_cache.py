"""Paged KV cache: fixed-size blocks, a block allocator (free list, reference counts, prefix cache)
and attention over paged K/V for a ragged batch.

Storage per layer: k, v `[num_blocks * block_size, Hkv, D]`; token position p of a sequence lives
in slot `block_table[p // block_size] * block_size + p % block_size`. Block 0 is the null block:
never handed out, it pads block tables (its keys are always masked out).

A pure-decode step (every scheduled sequence brings one token) runs as a batch `[B, 1]`, B padded to
a bucket (`build_decode`, `attend_paged_decode`): a padding row writes its K/V into the null block's
first slot and attends to that slot alone, so it never touches a real sequence's blocks, and the
compiled step keeps static shapes per bucket (only the key length L is symbolic).
A step holding a prefill chunk runs every scheduled sequence's new tokens flattened into one row
`[1, T]` (so the projections and MLP see no padding). Attention is gather-based SDPA per *group* of sequences: the
queries of a group are scattered into a padded `[S, H, Q, D]` batch, each sequence's keys/values
are gathered through its block table into `[S, Hkv, L, D]`, and a position mask
(key position <= query position) makes it causal. The engine puts decode sequences (Q = 1) and
prefill chunks (Q > 1) in separate groups, so a long prefill chunk does not pad every decode row to
its length. Everything is index arithmetic on tensors whose shapes depend only on the step's sizes,
so the step compiles with `fullgraph=True` (sizes marked dynamic).

The model attends through per-layer views (`PagedDecodeLayer` / `PagedStepLayer`: a layer's K/V
buffers and the step's `StepSlots`, set before each step), so the compiled steps trace one decoder
block for all layers (`models.llama.run_block`): SmolLM2-135M's decode bucket 1 and prefill graph
compile cold in 24.5 s, 263.1 s with the 30 layers unrolled (`benchmarks/results/serve_compile_cpu.json`).

Prefix caching: a full block is identified by `(hash of the previous block's key, its tokens)`.
Blocks whose reference count drops to zero keep their contents and stay findable until the free
list hands them out again (least recently freed first), so later requests that share a prompt
prefix reuse them instead of recomputing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from fmstack.backends import maybe_mark_dynamic
from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.generation.kv_cache import LayerKVBuffers, attend_visible
from fmstack.models.llama import causal_window_mask, sdpa

NULL_BLOCK = 0


class NoFreeBlocks(RuntimeError):
    """The allocator has no block left (the scheduler preempts before this can happen)."""


def block_key(parent: int | None, tokens: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """Prefix-cache key of a full block: (hash of the previous block's key (0 for the first), tokens).
    The tokens are compared exactly; only the parent link is a 64-bit hash."""
    return (0 if parent is None else parent, tuple(tokens))


def chain_hashes(tokens: Sequence[int], block_size: int, n_blocks: int | None = None) -> list[tuple]:
    """Prefix-cache keys of the first `n_blocks` full blocks of `tokens` (default: every full block)."""
    n = len(tokens) // block_size if n_blocks is None else n_blocks
    keys, parent = [], None
    for i in range(n):
        key = block_key(parent, tokens[i * block_size:(i + 1) * block_size])
        keys.append(key)
        parent = hash(key)
    return keys


class BlockAllocator:
    """Hands out block ids 1..num_blocks-1 (0 is the null block) with reference counts.

    Free blocks sit in `free` in the order they were freed; `allocate` takes the oldest one and
    drops any prefix-cache entry it held. `share` takes another reference to a cached block (taking
    it off the free list if nobody held it)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ParameterError(f"num_blocks={num_blocks} is invalid: at least 2 (block 0 is reserved)")
        if block_size < 1:
            raise ParameterError(f"block_size={block_size} is invalid: must be >= 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.cached: dict[tuple, int] = {}  # block key -> block id
        self.key_of: dict[int, tuple] = {}  # block id -> its key (while cached)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence (free blocks that still hold cached prefixes don't count)."""
        return self.num_blocks - 1 - len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise NoFreeBlocks("no free KV block")
        block, _ = self.free.popitem(last=False)
        key = self.key_of.pop(block, None)
        if key is not None and self.cached.get(key) == block:
            del self.cached[key]
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        if block == NULL_BLOCK or self.refs[block] <= 0:
            raise RuntimeError(f"block {block} released more often than taken")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None

    def release_all(self, blocks: Sequence[int]) -> None:
        """Release a sequence's blocks, last first: its tail is then reused before its prefix."""
        for b in reversed(blocks):
            self.release(b)

    def lookup(self, key: tuple) -> int | None:
        return self.cached.get(key) if self.prefix_caching else None

    def register(self, block: int, key: tuple) -> None:
        """Record that `block` holds the full block `key` (first writer wins)."""
        if self.prefix_caching and key not in self.cached:
            self.cached[key] = block
            self.key_of[block] = key


@dataclass
class AttnGroup:
    """Sequences attended together. S sequences, Q queries each (padded), L key slots each.

    q_index `[S, Q]`: flat token index of each query (padding repeats a real one);
    q_pos `[S, Q]`: its position (padding: 0); kv_slots `[S, L]`: cache slot of each key position
    (block-table expansion, null-block slots past the table)."""

    q_index: Tensor
    q_pos: Tensor
    kv_slots: Tensor


@dataclass
class StepMeta:
    """Paged-attention inputs of one step: slot_mapping `[T]` (cache slot per new token),
    out_index `[T]` (row of each token in the concatenated padded group outputs), groups."""

    slot_mapping: Tensor
    out_index: Tensor
    groups: tuple[AttnGroup, ...]

    def mark_dynamic(self) -> None:
        """Mark every size dynamic for torch.compile (one graph per group layout, not per size)."""
        mark = maybe_mark_dynamic
        mark(self.slot_mapping, 0)
        mark(self.out_index, 0)
        for g in self.groups:
            for t in (g.q_index, g.q_pos, g.kv_slots):
                mark(t, 0)
                mark(t, 1)


def build_group(chunks: Sequence[tuple[int, int, int, Sequence[int]]], block_size: int,
                device: torch.device | str = "cpu") -> AttnGroup:
    """chunks: (flat offset of the chunk's first token, first position, n tokens, block table) per
    sequence -> an `AttnGroup` (host-built index tensors)."""
    S = len(chunks)
    Q = max(n for _, _, n, _ in chunks)
    n_blocks = max(max(-(-(p0 + n) // block_size) for _, p0, n, _ in chunks), -(-2 // block_size))  # L >= 2
    q_index = torch.zeros(S, Q, dtype=torch.long)
    q_pos = torch.zeros(S, Q, dtype=torch.long)
    tables = torch.full((S, n_blocks), NULL_BLOCK, dtype=torch.long)
    for s, (off, p0, n, table) in enumerate(chunks):
        q_index[s, :n] = torch.arange(off, off + n)
        q_index[s, n:] = off
        q_pos[s, :n] = torch.arange(p0, p0 + n)
        used = min(len(table), n_blocks)
        tables[s, :used] = torch.as_tensor(table[:used], dtype=torch.long)
    offsets = torch.arange(block_size, dtype=torch.long)
    kv_slots = (tables[:, :, None] * block_size + offsets).reshape(S, n_blocks * block_size)
    return AttnGroup(q_index.to(device), q_pos.to(device), kv_slots.to(device))


def build_decode(rows: Sequence[tuple[int, Sequence[int]]], block_size: int, batch: int,
                 device: torch.device | str = "cpu") -> Tensor:
    """rows: (position of the new token, block table) per real sequence -> kv_slots `[batch, L]`: the
    cache slot of each key position of each row (null-block slots past a row's table), `batch` rows
    (>= len(rows)). Row r's new token goes to `kv_slots[r, position]` (`decode_slots`). Padding rows
    (position 0, an all-null table) write to and read from slot 0 of the null block only, which no
    real sequence ever reads."""
    if batch < len(rows):
        raise ValueError(f"build_decode: {len(rows)} rows do not fit a batch of {batch}")
    n_blocks = max(max((p // block_size + 1 for p, _ in rows), default=1), -(-2 // block_size))  # L >= 2: no 0/1
    tables = torch.full((batch, n_blocks), NULL_BLOCK, dtype=torch.long)
    for r, (pos, table) in enumerate(rows):
        used = min(len(table), n_blocks)
        tables[r, :used] = torch.as_tensor(table[:used], dtype=torch.long)
    offsets = torch.arange(block_size, dtype=torch.long)
    return (tables[:, :, None] * block_size + offsets).reshape(batch, n_blocks * block_size).to(device)


def decode_slots(kv_slots: Tensor, positions: Tensor) -> Tensor:
    """The cache slot `[B]` of each row's new token: its key slot at its own position (positions `[B, 1]`)."""
    return kv_slots.gather(1, positions)[:, 0]


def attend_paged_decode(k_cache: Tensor, v_cache: Tensor, kv_slots: Tensor, sliding_window: int | None,
                        q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
    """A pure-decode step on one layer: write each row's new K/V into its slot, gather the row's keys
    and values through `kv_slots` `[B, L]` and attend under a position mask.
    q `[B, H, 1, D]`, k/v `[B, Hkv, 1, D]`, positions `[B, 1]` -> `[B, H, 1, D]`."""
    slots = decode_slots(kv_slots, positions)
    k_cache.index_copy_(0, slots, k[:, :, 0].to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v[:, :, 0].to(v_cache.dtype))
    kg = k_cache[kv_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]
    vg = v_cache[kv_slots].transpose(1, 2).to(q.dtype)
    key_pos = torch.arange(kv_slots.shape[1], device=q.device)
    mask = causal_window_mask(key_pos[None, None, None, :], positions[:, None, :, None], sliding_window)  # [B,1,1,L]
    return attend_visible(q, kg, vg, mask)  # on CPU: the native kernel, over the visible keys only


def attend_paged(k_cache: Tensor, v_cache: Tensor, meta: StepMeta, sliding_window: int | None, q: Tensor,
                 k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
    """A flattened step on one layer: write the new K/V into their slots, then gather-based SDPA per
    group, outputs in flat token order. q `[1, H, T, D]`, k/v `[1, Hkv, T, D]` -> `[1, H, T, D]`."""
    k_cache.index_copy_(0, meta.slot_mapping, k[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v[0].transpose(0, 1).to(v_cache.dtype))
    qf = q[0]  # [H, T, D]
    outs = []
    for g in meta.groups:
        S, Q = g.q_index.shape
        qg = qf[:, g.q_index].transpose(0, 1)  # [S, H, Q, D]
        kg = k_cache[g.kv_slots].transpose(1, 2).to(q.dtype)  # [S, Hkv, L, D]
        vg = v_cache[g.kv_slots].transpose(1, 2).to(q.dtype)
        key_pos = torch.arange(g.kv_slots.shape[1], device=q.device)
        mask = causal_window_mask(key_pos[None, None, :], g.q_pos[:, :, None], sliding_window)[:, None]  # [S,1,Q,L]
        og = sdpa(qg, kg, vg, mask=mask)  # [S, H, Q, D]
        outs.append(og.transpose(1, 2).reshape(S * Q, og.shape[1], og.shape[3]))
    flat = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # [sum S*Q, H, D]
    return flat[meta.out_index].permute(1, 0, 2)[None]  # [1, H, T, D]


class StepSlots(nn.Module):
    """The running step's paged-attention inputs, shared by every layer's view and set before each step
    (`PagedKVCache.set_decode` / `set_step`): `kv_slots` `[B, L]` of a decode step, `meta` (a
    `StepMeta`) of a flattened one. Plain attributes, not buffers: Dynamo keeps buffer shapes static,
    and these sizes change from step to step."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.kv_slots = torch.zeros(1, 2, dtype=torch.long, device=device)
        self.meta: StepMeta | None = None


class PagedLayer(nn.Module):
    """One layer of a `PagedKVCache` (`models.llama.LayerCache`): its k/v buffers (shared, not copied)
    and the step's `StepSlots`. Every layer's view has the same structure, so the compile region over
    the blocks (`models.llama.run_block`) traces and builds one block for all layers: SmolLM2-135M's
    30 layers compile as one block (docs/compile.md)."""

    def __init__(self, k: Tensor, v: Tensor, slots: StepSlots, sliding_window: int | None):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.slots = slots
        self.sliding_window = sliding_window


class PagedDecodeLayer(PagedLayer):
    """A layer of a pure-decode step `[B, 1]`."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        return attend_paged_decode(self.k, self.v, self.slots.kv_slots, self.sliding_window, q, k, v, positions)


class PagedStepLayer(PagedLayer):
    """A layer of a flattened step `[1, T]`."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        return attend_paged(self.k, self.v, self.slots.meta, self.sliding_window, q, k, v, positions)


class PagedViews:
    """The model's `AttentionCache` for one kind of step: `layer_views` for the compile region; None
    with a sliding window, where every layer is traced inline (as `StaticKVCache` does, for the same
    torch 2.13 Dynamo failure)."""

    def __init__(self, layers: tuple[PagedLayer, ...], sliding_window: int | None):
        self.layers = layers
        self.layer_views = layers if sliding_window is None else None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        return self.layers[layer].attend(q, k, v, positions)


class PagedKVCache(LayerKVBuffers):
    """The K/V storage: per layer `k_i`, `v_i` `[num_blocks * block_size, Hkv, D]`."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(config.n_layers, (num_blocks * block_size, config.n_kv_heads, config.head_dim), dtype,
                         device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.sliding_window = config.sliding_window
        self.slots = StepSlots(device)
        # tuples of views, not submodules: the buffers are the cache's own
        self.decoding, self.stepping = (
            PagedViews(tuple(kind(*self.layer_kv(i), self.slots, self.sliding_window) for i in range(self.n_layers)),
                       self.sliding_window) for kind in (PagedDecodeLayer, PagedStepLayer))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * dtype.itemsize

    def set_step(self, meta: StepMeta) -> PagedViews:
        """Set the next flattened step's inputs; returns the step's `AttentionCache`."""
        self.slots.meta = meta
        return self.stepping

    def set_decode(self, kv_slots: Tensor) -> PagedViews:
        """Set the next decode step's key slots (`build_decode`); returns the step's `AttentionCache`."""
        self.slots.kv_slots = kv_slots
        return self.decoding
