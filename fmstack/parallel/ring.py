"""Context parallelism: exact ring attention over a sequence split across ranks, with a sharded KV cache.

Every rank holds the whole model; the *tokens* are split. Shapes: B batch, T tokens of the call,
N ranks, H / Hkv query / key-value heads, D head_dim, "column" = index of a token in the call's
(left-padded) sequence, i.e. its KV-cache slot.

Prefill (ring mode, used when the call starts an empty cache and T >= 2N): the T columns are cut
into 2N contiguous chunks (sizes differ by at most one) and rank r takes chunks r and 2N-1-r
("zig-zag"), so every rank does the same causal-attention work. Each rank runs the whole model on
its own tokens with their true RoPE positions; embeddings, norms and MLP stay local. In every layer
`attend` passes K/V blocks around the ring (rank r sends to r+1, receives from r-1, the next block's
transfer overlapped with this block's compute) and folds each block into an online softmax: fp32
running output and log-sum-exp per query. Chunk pairs that causality hides are skipped; the
diagonal chunk gets the causal mask; padding and packed-sequence masks are applied per block.
Unmasked blocks run the fused CPU flash kernel (it returns the log-sum-exp too); masked blocks,
and CUDA, an fp32 matmul-softmax chunked over queries.

Decode (sharded mode, every later call, and prompts shorter than 2N): every rank runs the model on
the same (few) tokens; column c's K/V is stored only by rank c % N, so each rank holds ~1/N of the
cache (after prefill each rank keeps its own zig-zag shard). Each rank attends over its local
shard and one all-gather of (out, lse) `[B, H, T, D+1]` per layer merges the partials exactly.

`ContextParallelModel` keeps the `Transformer` interface (`forward`, `hidden_states`, `output`,
`config`, `layers`, plus `make_cache`): every rank is called with the same full inputs and returns
the same full outputs, so `Generator`, the scorer (HellaSwag, perplexity) work unchanged.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fmstack.backends import cpu_flash_attention
from fmstack.config import ModelConfig
from fmstack.errors import FmstackError, ParameterError
from fmstack.generation.kv_cache import PaddedKVCache
from fmstack.models.build import build_model
from fmstack.models.llama import Transformer, fold_gqa, unfold_gqa
from fmstack.parallel.dist import DistInfo, fault_point, global_rank
from fmstack.parallel.plan import WholeTensors, chunk

log = logging.getLogger(__name__)

SCORE_CHUNK_ELEMS = 1 << 24  # fp32 attention scores per query chunk (64 MiB)


# -- online softmax -------------------------------------------------------------------------------
def partial_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                      causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax attention of q `[B, H, Tq, D]` over one block k/v `[B, Hkv, Tk, D]` (GQA: query head h
    uses kv head h // (H/Hkv)); mask bool broadcastable to `[B, 1, Tq, Tk]` (True = visible), or
    `causal` (query i sees keys <= i; Tq == Tk, no mask). Returns out `[B, H, Tq, D]` (fp32,
    normalized within the block; 0 where nothing is visible) and lse `[B, H, Tq]` (fp32 natural-log
    sum of exp(scores) over visible keys; -inf where none). Unmasked CPU blocks use the fused
    flash kernel (which returns the lse); the rest an fp32 matmul-softmax chunked over queries."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tk == 0 or Tq == 0:
        return (q.new_zeros(B, H, Tq, D, dtype=torch.float32),
                q.new_full((B, H, Tq), -math.inf, dtype=torch.float32))
    G = H // Hkv
    if mask is None and q.device.type == "cpu":  # the fused CPU flash kernel (fmstack.backends)
        qf, kf, vf = q.float(), k.float(), v.float()
        if causal:  # kv heads repeated for the kernel
            return cpu_flash_attention(qf, kf.repeat_interleave(G, 1), vf.repeat_interleave(G, 1), True)
        # no mask: rows are independent, so a kv head's G query heads go in as one longer query
        out, lse = cpu_flash_attention(fold_gqa(qf, Hkv), kf, vf, False)
        return unfold_gqa(out, H), unfold_gqa(lse, H)
    if causal:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()[None, None]
    scale = 1.0 / math.sqrt(D)
    kf = k.float().unsqueeze(2)  # [B, Hkv, 1, Tk, D]
    vf = v.float().unsqueeze(2)
    qf = q.float().reshape(B, Hkv, G, Tq, D)
    if mask is not None:
        mask = mask.unsqueeze(2)  # [B|1, 1, 1, Tq, Tk]
    step = max(1, SCORE_CHUNK_ELEMS // max(1, B * H * Tk))
    outs, lses = [], []
    for s in range(0, Tq, step):
        scores = torch.matmul(qf[:, :, :, s:s + step], kf.transpose(-1, -2)) * scale  # [B, Hkv, G, t, Tk]
        if mask is not None:
            scores = scores.masked_fill(~mask[..., s:s + step, :], -math.inf)
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all masked: exp(-inf - 0) = 0
        p = torch.exp(scores - m)
        denom = p.sum(-1, keepdim=True)
        outs.append(torch.matmul(p, vf) / denom.clamp_min(torch.finfo(torch.float32).tiny))
        lses.append((m + torch.log(denom)).squeeze(-1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=3)
    return out.reshape(B, H, Tq, D), lse.reshape(B, H, Tq)


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets: out `[..., D]`, lse `[...]` (fp32)."""
    lse = torch.logaddexp(lse_a, lse_b)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa, wb = torch.exp(lse_a - ref)[..., None], torch.exp(lse_b - ref)[..., None]
    return out_a * wa + out_b * wb, lse


def merge_stacked(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Combine partials stacked on dim 0: outs `[R, ..., D]`, lses `[R, ...]` -> (`[..., D]`, `[...]`)."""
    m = lses.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)  # [R, ...]
    total = w.sum(0)
    out = (outs * w[..., None]).sum(0) / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out, m + torch.log(total)


def visible(q_cols: Tensor, k_cols: Tensor, pad: Tensor | None = None, full_mask: Tensor | None = None) -> Tensor:
    """Which keys each query sees, by column: causal, keys at columns >= pad[b] (left padding hides
    earlier slots, but a padding query still sees itself), and within `full_mask` `[B, 1, T, T]`
    when given (a packed-sequence mask over the call's columns). -> bool `[B|1, 1, Tq, Tk]`."""
    qc, kc = q_cols[:, None], k_cols[None, :]
    m = (kc <= qc)[None]  # [1, Tq, Tk]
    if pad is not None:
        m = m & ((kc[None] >= pad[:, None, None]) | (kc == qc)[None])
    if full_mask is not None:
        m = m & full_mask[:, 0].index_select(1, q_cols).index_select(2, k_cols)
    return m[:, None]


# -- layout ------------------------------------------------------------------------------------------
class ZigZag:
    """T columns in 2N chunks; rank r holds chunks (r, 2N-1-r). Needs T >= 2N (no empty chunk)."""

    def __init__(self, T: int, world: int):
        self.T, self.world = T, world
        self.chunks = [chunk(T, 2 * world, i) for i in range(2 * world)]
        self.max_len = max(self.shard_len(r) for r in range(world))

    def chunk_ids(self, rank: int) -> tuple[int, int]:
        return rank, 2 * self.world - 1 - rank

    def shard_len(self, rank: int) -> int:
        return sum(len(self.chunks[c]) for c in self.chunk_ids(rank))

    def columns(self, rank: int, device=None) -> Tensor:
        """Columns of rank's tokens `[shard_len]` (int64), in the order the rank holds them."""
        a, b = (self.chunks[c] for c in self.chunk_ids(rank))
        return torch.cat([torch.arange(a.start, a.stop, device=device), torch.arange(b.start, b.stop, device=device)])


# -- the sharded KV cache --------------------------------------------------------------------------
class RingKVCache(PaddedKVCache):
    """This rank's share of a static KV cache: k, v `[B, Hkv, C, D]` per layer, C = ceil(S/N) + 3
    slots (the zig-zag prefill shard plus every N-th decode column), and `cols [C]` (the column each
    slot holds; empty slots hold a column no query reaches). Host counters: `length` (columns
    written so far, all ranks) and `fill` (slots used here). Driven by `ContextParallelModel`."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, world: int, rank: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 n_kv_heads: int | None = None):
        capacity = -(-max_seq_len // world) + 3
        shape = (batch_size, n_kv_heads or config.n_kv_heads, capacity, config.head_dim)
        super().__init__(config, batch_size, max_seq_len, shape, config.n_layers, dtype, device)
        self.world, self.rank, self.capacity = world, rank, capacity
        self.register_buffer("cols", torch.full((self.capacity,), _NEVER, dtype=torch.long, device=device),
                             persistent=False)
        self.length = self.fill = 0

    @torch.no_grad()
    def reset(self, pad: Tensor | None = None) -> None:
        """Start new sequences with `pad[b]` left-padding columns for row b (zeros if None)."""
        super().reset(pad)
        self.cols.fill_(_NEVER)
        self.length = self.fill = 0

    def _claim(self, cols: Tensor, T: int) -> int:
        """Record that this rank now stores `cols` and the call adds T columns; returns the first slot."""
        n = cols.numel()
        if self.length + T > self.max_seq_len:
            raise ParameterError(f"the KV cache holds {self.max_seq_len} tokens; {self.length} + {T} do not fit")
        if self.fill + n > self.capacity:
            raise FmstackError(f"rank {self.rank}'s KV shard is full ({self.capacity} slots)")
        start = self.fill
        self.cols[start:start + n] = cols
        self.fill += n
        self.length += T
        return start


_NEVER = torch.iinfo(torch.int64).max  # column of an empty slot: after every query, so never visible


# -- per-call attention objects (what the inner Transformer's layers call) -------------------------
class _RingAttention:
    """`AttentionCache` for one ring-mode call on this rank's zig-zag shard (see module docstring)."""

    def __init__(self, layout: ZigZag, rank: int, group, device, pad: Tensor | None, full_mask: Tensor | None,
                 store: RingKVCache | None):
        self.layout, self.rank, self.world, self.group = layout, rank, layout.world, group
        self.pad, self.full_mask, self.store = pad, full_mask, store
        self.send_to, self.recv_from = (rank + 1) % self.world, (rank - 1) % self.world
        self.cols = [layout.columns(r, device) for r in range(self.world)]  # every rank's columns
        self.next, self.prev = global_rank(group, self.send_to), global_rank(group, self.recv_from)
        self._masks: dict[tuple[int, int], Tensor | None] = {}  # (query chunk, key chunk) -> mask, for all layers

    def _mask(self, qc_id: int, kc_id: int, k_cols: Tensor, device) -> Tensor | None:
        """Mask of query chunk `qc_id` vs key chunk `kc_id` (None: all visible, or causal on the
        diagonal), built once per call."""
        key = (qc_id, kc_id)
        if key not in self._masks:
            if self.pad is None and self.full_mask is None:
                self._masks[key] = None  # a whole chunk in the past, or the diagonal (causal)
            else:
                q = self.layout.chunks[qc_id]
                self._masks[key] = visible(torch.arange(q.start, q.stop, device=device), k_cols, self.pad,
                                           self.full_mask)
        return self._masks[key]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q `[B, H, n_r, D]`, k/v `[B, Hkv, n_r, D]` of this rank's shard -> out `[B, H, n_r, D]`."""
        B, n = q.shape[0], q.shape[2]
        if self.store is not None:  # this rank keeps its own shard's K/V (slots [0, n))
            kc, vc = self.store.layer_kv(layer)
            kc[:B, :, :n] = k.to(kc.dtype)
            vc[:B, :, :n] = v.to(vc.dtype)
        L = self.layout
        block = k.new_zeros(2, *k.shape[:2], L.max_len, k.shape[3])  # K and V, padded to the longest shard
        block[0, :, :, :n], block[1, :, :, :n] = k, v
        first, second = L.chunk_ids(self.rank)
        n_first = len(L.chunks[first])
        q_parts = [(first, q[:, :, :n_first]), (second, q[:, :, n_first:])]
        acc: list[tuple[Tensor, Tensor] | None] = [None, None]
        for step in range(self.world):
            src = (self.rank - step) % self.world
            pending = None
            if step < self.world - 1:  # start moving this block on while we compute with it
                incoming = torch.empty_like(block)
                # send and receive posted as one batch: separate isend/irecv with the same peer (N=2)
                # on one NCCL communicator can deadlock; gloo runs the batch as the two ops
                pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, block, self.next, self.group),
                                                  dist.P2POp(dist.irecv, incoming, self.prev, self.group)])
            offset = 0
            for kc_id in L.chunk_ids(src):
                kr = L.chunks[kc_id]
                kb, vb = block[0, :, :, offset:offset + len(kr)], block[1, :, :, offset:offset + len(kr)]
                k_cols = self.cols[src][offset:offset + len(kr)]
                offset += len(kr)
                for i, (qc_id, qp) in enumerate(q_parts):
                    if kc_id > qc_id:
                        continue  # the whole key chunk is in this query chunk's future
                    mask = self._mask(qc_id, kc_id, k_cols, q.device)
                    diagonal = kc_id == qc_id and mask is None
                    part = partial_attention(qp, kb, vb, mask, causal=diagonal)
                    acc[i] = part if acc[i] is None else merge_partials(*acc[i], *part)
            if pending is not None:
                for w in pending:
                    w.wait()
                block = incoming
        return torch.cat([acc[0][0], acc[1][0]], dim=2).to(q.dtype)


class _ShardedAttention:
    """`AttentionCache` for a sharded-mode call: every rank has the same T tokens (columns
    `start..start+T-1`); column c's K/V goes to rank c % N; partials over each rank's shard are
    merged with one all-gather of (out, lse) per layer."""

    def __init__(self, store: RingKVCache, start: int, T: int, group, device):
        self.store, self.group, self.T = store, group, T
        N, r = store.world, store.rank
        self.first = (r - start) % N  # this rank stores tokens first, first + N, ... of the call
        cols = torch.tensor(range(start + self.first, start + T, N), dtype=torch.long, device=device)
        self.n_mine = cols.numel()
        self.slot = store._claim(cols, T)
        self.n_local = self.slot + self.n_mine
        self.q_cols = torch.arange(start, start + T, device=device)
        self._mask: Tensor | None = None  # the same for every layer: built at the first
        self.padded = bool(store.pad.any())  # one host check per call

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q `[B, H, T, D]`, k/v `[B, Hkv, T, D]` (the same on every rank) -> out `[B, H, T, D]`."""
        B = q.shape[0]
        st = self.store
        kc, vc = st.layer_kv(layer)
        kc, vc = kc[:B], vc[:B]
        if self.n_mine:
            kc[:, :, self.slot:self.n_local] = k[:, :, self.first::st.world].to(kc.dtype)
            vc[:, :, self.slot:self.n_local] = v[:, :, self.first::st.world].to(vc.dtype)
        if self._mask is None and (self.T > 1 or self.padded):  # one token, no padding: sees every key here
            self._mask = visible(self.q_cols, st.cols[:self.n_local], st.pad[:B])
        out, lse = partial_attention(q, kc[:, :, :self.n_local], vc[:, :, :self.n_local], self._mask)
        packed = torch.cat([out, lse[..., None]], dim=-1).contiguous()  # [B, H, T, D + 1]
        parts = [torch.empty_like(packed) for _ in range(st.world)]
        dist.all_gather(parts, packed, group=self.group)
        stacked = torch.stack(parts)
        out, _ = merge_stacked(stacked[..., :-1], stacked[..., -1])
        return out.to(q.dtype)


# -- the plan and the model wrapper ----------------------------------------------------------------
class ContextParallel(WholeTensors):
    """`ParallelPlan` for one rank: the whole model on every rank, wrapped by `finish`."""

    def __init__(self, info: DistInfo, group=None):
        self.info = info
        self.group = group if group is not None else dist.group.WORLD

    def build(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
        if config.sliding_window is not None:
            raise ParameterError(f"--parallel cp: sliding-window attention (sliding_window={config.sliding_window}) "
                                 "is not supported by ring attention; use tp or pp")
        log.info("cp rank %d/%d: whole model, 1/%d of each sequence", self.info.rank, self.info.world_size,
                 self.info.world_size)
        return build_model(config, device, dtype)

    def finish(self, model: Transformer) -> "ContextParallelModel":
        return ContextParallelModel(model, self)


class ContextParallelModel(nn.Module):
    """A `Transformer` run with its sequence split across the ranks; same results, and a
    `StagedCausalLM` (its ring send/recv per layer cannot be traced: it runs eager)."""

    compiles_whole = False

    def __init__(self, model: Transformer, plan: ContextParallel):
        super().__init__()
        self.inner, self.config, self.group = model, model.config, plan.group
        self.rank, self.world = plan.info.rank, plan.info.world_size

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    @property
    def output(self) -> nn.Module:
        return self.inner.output

    def make_cache(self, batch_size: int, max_seq_len: int, static=None, **kw) -> RingKVCache:
        """A cache sharded by column across the ranks (`static` is not needed: always a RingKVCache)."""
        return RingKVCache(self.config, batch_size, max_seq_len, self.world, self.rank, **kw)

    def compile_stage(self) -> None:
        """Called by `Generator(compile=True)`: context parallel runs eager (ring send/recv per layer)."""
        log.warning("--parallel cp runs eager: its per-layer send/recv cannot be traced, --compile is ignored")

    def _run(self, tokens: Tensor, positions: Tensor | None, cache, last_only: bool) -> Tensor:
        """Final normed hidden states `[B, T, dim]` (`[B, 1, dim]` with last_only), equal on every rank."""
        fault_point("forward")
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, -1)
        N = self.world
        store = cache if isinstance(cache, RingKVCache) else None
        full_mask = getattr(cache, "mask", None)
        if cache is not None and store is None and full_mask is None:
            raise FmstackError(f"--parallel cp cannot run with a {type(cache).__name__} attention cache "
                               "(supported: its own RingKVCache, a packed-sequence mask, or none)")
        if store is not None and B > store.batch_size:
            raise ParameterError(f"batch of {B} rows exceeds the KV cache's {store.batch_size}")
        if T >= 2 * N and (store is None or store.length == 0):
            return self._ring(tokens, positions, store, full_mask, last_only)
        if store is None:  # short call without a cache: every rank runs it whole
            h = self.inner.hidden_states(tokens, positions, cache)
        else:
            h = self.inner.hidden_states(tokens, positions, _ShardedAttention(store, store.length, T, self.group,
                                                                              tokens.device))
        return h[:, -1:] if last_only else h

    def _ring(self, tokens: Tensor, positions: Tensor, store: RingKVCache | None, full_mask: Tensor | None,
              last_only: bool) -> Tensor:
        B, T = tokens.shape
        N, dev = self.world, tokens.device
        layout = ZigZag(T, N)
        cols = layout.columns(self.rank, dev)
        pad = None
        if store is not None:
            store._claim(cols, T)
            pad = store.pad[:B]
            pad = pad if bool(pad.any()) else None  # one host check per prefill: no padding, no pad mask
        attn = _RingAttention(layout, self.rank, self.group, dev, pad, full_mask, store)
        h = self.inner.hidden_states(tokens[:, cols], positions[:, cols], attn)  # [B, n_r, dim]
        if last_only:  # column T-1 ends chunk 2N-1, the last of rank 0's tokens
            last = h[:, -1:].contiguous()
            dist.broadcast(last, src=global_rank(self.group, 0), group=self.group)
            return last
        buf = h.new_zeros(B, layout.max_len, h.shape[-1])
        buf[:, :h.shape[1]] = h
        parts = [torch.empty_like(buf) for _ in range(N)]
        dist.all_gather(parts, buf, group=self.group)
        full = h.new_empty(B, T, h.shape[-1])
        for r in range(N):
            full[:, attn.cols[r]] = parts[r][:, :layout.shard_len(r)]
        return full

    @torch.compiler.disable
    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache=None, last_only: bool = False) -> Tensor:
        """tokens/positions `[B, T]` (the same on every rank; with a `RingKVCache`, positions are
        column - pad as `Generator` makes them) -> logits `[B, T, V]` (`[B, 1, V]`) on every rank."""
        return self.inner.output(self._run(tokens, positions, cache, last_only))

    @torch.compiler.disable
    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, cache=None) -> Tensor:
        """tokens `[B, T]` -> final normed hidden states `[B, T, dim]` on every rank (scoring path)."""
        return self._run(tokens, positions, cache, last_only=False)
