"""Which tokens of which requests run in the next step, and which KV blocks they use (no model here).

`schedule()`:
1. running sequences first (decode tokens before prefill chunks, in arrival order), each given
   blocks for its new tokens; when blocks run out the latest-arrived running sequence is preempted
   (its blocks freed; it goes back to the front of `waiting` and is recomputed later);
2. then waiting sequences are admitted, oldest first, while there are free blocks for their whole
   current token list, a free seat (`max_num_seqs`) and token budget (`max_num_batched_tokens`);
   prompts are split into chunks to fit the budget, and full blocks found in the prefix cache are
   reused instead of recomputed.
`update_from_output()` closes the loop after the runner: it advances each sequence, registers its
newly completed blocks in the prefix cache and appends the sampled tokens. A running sequence with
speculative proposals (`seq.draft`, see `speculation`) runs them with its decode token when the
budget and blocks allow (else it decodes one token); the proposals the runner rejected are rolled
back here: `num_computed` stops at the accepted ones and blocks holding only rejected K/V are freed. Prefix matching and
registration both key blocks through `paged_cache.block_key` (`chain_hashes` chains it), so a
registered block is found again.

Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import logging
from collections import deque

from fmstack.serve.paged_cache import BlockAllocator, block_key, chain_hashes
from fmstack.serve.request import RunnerOutput, ScheduledChunk, SchedulerOutput, Sequence

log = logging.getLogger(__name__)


class Scheduler:
    """Continuous batching over a `BlockAllocator` (see the module docstring)."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator, self.block_size = allocator, allocator.block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.n_prefix_hits = self.n_preemptions = 0

    # -- queues ------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished, take it off the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.finished, seq.finish_reason = True, reason
        self._free_blocks(seq)

    # -- blocks ------------------------------------------------------------------------------------
    def _reserve(self, seq: Sequence, n_tokens: int) -> bool:
        """Give `seq` blocks for its first `n_tokens` tokens; False (nothing taken) if too few are free."""
        need = -(-n_tokens // self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        seq.blocks.extend(self.allocator.allocate() for _ in range(need))
        return True

    def _free_blocks(self, seq: Sequence) -> None:
        self.allocator.release_all(seq.blocks)
        seq.blocks, seq.num_computed, seq.n_hashed, seq.parent_hash = [], 0, 0, None

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV, keep the tokens; back to the front of the queue."""
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.preemptions += 1
        self.n_preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted %s (%d tokens)", seq.id, seq.num_tokens)

    def _next_key(self, seq: Sequence) -> tuple:
        """The prefix-cache key of seq's block number `n_hashed` (the one key function, see module doc)."""
        bs, i = self.block_size, seq.n_hashed
        return block_key(seq.parent_hash, seq.tokens[i * bs:(i + 1) * bs])

    def _cached_prefix(self, seq: Sequence) -> list[tuple[tuple, int]]:
        """(key, block) of seq's leading full blocks found in the prefix cache, leaving at least one
        token to compute (its logits are needed). Nothing is taken."""
        if not self.allocator.prefix_caching or seq.wants_prompt_logprobs:
            return []
        hits = []
        for key in chain_hashes(seq.tokens, self.block_size, (seq.num_tokens - 1) // self.block_size):
            block = self.allocator.lookup(key)
            if block is None:
                break
            hits.append((key, block))
        return hits

    def _use_prefix(self, seq: Sequence, hits: list[tuple[tuple, int]]) -> None:
        """Start a (block-less) sequence on the cached blocks `hits`: they count as computed."""
        for _, block in hits:
            self.allocator.share(block)
        seq.blocks = [b for _, b in hits]
        seq.n_hashed = len(hits)
        seq.parent_hash = hash(hits[-1][0]) if hits else None
        seq.num_computed = len(hits) * self.block_size
        self.n_prefix_hits += seq.num_computed

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Record seq's newly computed full blocks in the prefix cache."""
        while seq.n_hashed < seq.num_computed // self.block_size:
            key = self._next_key(seq)
            self.allocator.register(seq.blocks[seq.n_hashed], key)
            seq.parent_hash, seq.n_hashed = hash(key), seq.n_hashed + 1

    # -- the schedule ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks; see the module docstring."""
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self._cached_prefix(seq)
            hits_free = sum(1 for _, b in hits if self.allocator.refs[b] == 0)  # sharing takes them off the free list
            if -(-seq.num_tokens // self.block_size) - len(hits) > self.allocator.num_free - hits_free:
                break
            self.waiting.popleft()
            self._use_prefix(seq, hits)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):  # cannot happen: checked above
                raise RuntimeError("block accounting error")
            self.running.append(seq)
            out.chunks.append(self._chunk(seq, n))
            budget -= n
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Decode tokens, then prefill chunks, of running sequences, preempting when blocks run out;
        returns the budget left."""
        chosen: set[int] = set()
        for decode_pass in (True, False):
            i = 0
            while i < len(self.running) and budget > 0:
                seq = self.running[i]
                remaining = seq.num_tokens - seq.num_computed
                if id(seq) in chosen or (remaining == 1) != decode_pass:
                    i += 1
                    continue
                n = min(remaining, budget)
                draft = seq.draft[:budget - n] if decode_pass else []
                if draft and not self._reserve(seq, seq.num_computed + n + len(draft)):
                    draft = []  # no blocks for the proposals: decode the one token
                if self._reserve(seq, seq.num_computed + n):
                    out.chunks.append(self._chunk(seq, n, draft))
                    chosen.add(id(seq))
                    budget -= n
                    i += 1
                    continue
                victims = [s for s in reversed(self.running) if id(s) not in chosen and s is not seq]
                victim = victims[0] if victims else seq
                self._preempt(victim)  # seq's index is unchanged unless seq itself went
                out.preempted.append(victim.id)
        return budget

    @staticmethod
    def _chunk(seq: Sequence, n: int, draft: list[int] = ()) -> ScheduledChunk:
        p0 = seq.num_computed
        last = p0 + n == seq.num_tokens
        return ScheduledChunk(seq, p0, tuple(seq.tokens[p0:p0 + n]) + tuple(draft), tuple(seq.blocks),
                              seq.wants_prompt_logprobs, last and seq.params.sampling.max_new_tokens > 0, tuple(draft))

    def update_from_output(self, scheduled: SchedulerOutput, output: RunnerOutput) -> list[Sequence]:
        """Advance every scheduled sequence that is still live past its chunk, register its full
        blocks, append its sampled token. Returns the sequences that got a token."""
        grew = []
        for c in scheduled.chunks:
            seq = c.seq
            if seq.finished or c.seq.id in output.failed:  # aborted or failed while the step ran
                continue
            accepted = output.accepted.get(seq.id, [])  # speculative proposals kept: computed, now tokens
            seq.tokens.extend(accepted)
            seq.num_computed = c.start + c.n - len(c.draft) + len(accepted)
            self._register_full_blocks(seq)
            tok = output.sampled.get(seq.id)
            if tok is not None:
                seq.tokens.append(tok)
                grew.append(seq)
            if c.draft:
                self._drop_rejected(seq)
        return grew

    def _drop_rejected(self, seq: Sequence) -> None:
        """Release the blocks past seq's tokens: they hold only rejected proposals' K/V (never
        registered: past `num_computed`). Rejected K/V in a kept block lies past the sequence's length:
        the position mask hides it until the next step writes those slots again."""
        keep = -(-seq.num_tokens // self.block_size)
        if len(seq.blocks) > keep:
            self.allocator.release_all(seq.blocks[keep:])
            del seq.blocks[keep:]
