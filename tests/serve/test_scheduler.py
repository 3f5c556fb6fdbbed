"""The scheduler alone, without a model: a fake runner samples a fixed token, so each test checks
admission, budgets, blocks, preemption and the prefix cache exactly."""

from __future__ import annotations

from fmstack.generation.sampling import SamplingParams
from fmstack.serve.paged_cache import BlockAllocator, chain_hashes
from fmstack.serve.request import RequestParams, RunnerOutput, Sequence
from fmstack.serve.scheduler import Scheduler

TOKEN = 7  # what the fake runner samples


def make(num_blocks=32, block_size=4, max_num_seqs=8, budget=64, prefix_caching=True):
    return Scheduler(BlockAllocator(num_blocks, block_size, prefix_caching), max_num_seqs, budget)


def seq(rid, prompt, max_new=4, arrival=0, prompt_logprobs=None):
    return Sequence(rid, list(prompt), RequestParams(SamplingParams(max_new_tokens=max_new),
                                                     prompt_logprobs=prompt_logprobs), arrival)


def scheduled_pair(x_len, y_len):
    """A scheduler, sequences x and y (prompts of the given lengths) and their first scheduled step."""
    s = make()
    x, y = seq("x", range(x_len)), seq("y", range(y_len))
    s.add(x)
    s.add(y)
    return s, x, y, s.schedule()


def fake_run(out):
    return RunnerOutput(sampled={c.seq.id: TOKEN for c in out.chunks if c.sample})


def step(s):
    out = s.schedule()
    return out, s.update_from_output(out, fake_run(out))


def plan(out):
    return [(c.seq.id, c.start, c.n, c.sample) for c in out.chunks]


def test_admission_in_arrival_order_up_to_max_num_seqs():
    s = make(max_num_seqs=2)
    for i, n in enumerate([3, 5, 2]):
        s.add(seq(str(i), range(n), arrival=i))
    out, grew = step(s)
    assert plan(out) == [("0", 0, 3, True), ("1", 0, 5, True)]
    assert [q.id for q in grew] == ["0", "1"] and [q.id for q in s.waiting] == ["2"]
    assert s.running[0].tokens == [0, 1, 2, TOKEN] and s.running[0].num_computed == 3
    out, _ = step(s)  # decodes only: no seat for "2"
    assert plan(out) == [("0", 3, 1, True), ("1", 5, 1, True)]


def test_chunked_prefill_within_the_token_budget_decodes_first():
    s = make(budget=4)
    s.add(seq("a", range(2)))
    out, _ = step(s)
    assert plan(out) == [("a", 0, 2, True)]
    s.add(seq("b", range(10, 20)))
    plans = [plan(step(s)[0]) for _ in range(3)]
    assert plans == [[("a", 2, 1, True), ("b", 0, 3, False)],  # a's decode first, b gets the rest
                     [("a", 3, 1, True), ("b", 3, 3, False)],
                     [("a", 4, 1, True), ("b", 6, 3, False)]]
    out, grew = step(s)  # b's last prompt token runs with the decodes (stops are the engine's business)
    assert plan(out) == [("a", 5, 1, True), ("b", 9, 1, True)] and {q.id for q in grew} == {"a", "b"}
    assert all(q.num_computed == q.num_tokens - 1 for q in s.running)


def test_block_exhaustion_preempts_the_latest_and_it_resumes():
    s = make(num_blocks=5, block_size=2, prefix_caching=False)  # 4 usable blocks
    first, second = seq("first", [11, 12, 13, 14], arrival=0), seq("second", [21, 22, 23, 24], arrival=1)
    s.add(first)
    s.add(second)
    out, _ = step(s)  # 2 blocks each
    assert plan(out) == [("first", 0, 4, True), ("second", 0, 4, True)] and s.allocator.num_free == 0
    out, _ = step(s)  # both need a 3rd block for position 4: "second" (latest) is preempted
    assert plan(out) == [("first", 4, 1, True)] and out.preempted == ["second"]
    assert second.blocks == [] and second.num_computed == 0 and second.tokens == [21, 22, 23, 24, TOKEN]
    assert list(s.waiting) == [second] and second.preemptions == 1 and s.n_preemptions == 1
    s.finish(first, "length")
    assert s.allocator.num_free == 4
    out, _ = step(s)  # recomputed: its whole token list is the prompt now
    assert plan(out) == [("second", 0, 5, True)] and second.tokens == [21, 22, 23, 24, TOKEN, TOKEN]


def test_prefix_cache_hits_and_registration_share_one_key():
    s = make(block_size=4)
    prompt = list(range(100, 110))  # two full blocks + 2 tokens
    a = seq("a", prompt)
    s.add(a)
    step(s)
    keys = chain_hashes(a.tokens, 4)
    assert a.n_hashed == 2 and [s.allocator.lookup(k) for k in keys] == a.blocks[:2]
    s.finish(a, "stop")  # blocks free but still cached
    assert s.allocator.num_used == 0
    b = seq("b", prompt[:8] + [1, 2, 3])
    s.add(b)
    out, _ = step(s)
    assert plan(out) == [("b", 8, 3, True)] and s.n_prefix_hits == 8
    assert out.chunks[0].block_table[:2] == tuple(s.allocator.lookup(k) for k in keys)
    c = seq("c", prompt[:8], prompt_logprobs=0)  # prompt logprobs need every position: no reuse
    s.add(c)
    out, _ = step(s)
    assert ("c", 0, 8, True) in plan(out) and s.n_prefix_hits == 8


def test_a_whole_prompt_hit_still_computes_its_last_token():
    s = make(block_size=4)
    a = seq("a", range(8))
    s.add(a)
    step(s)
    s.finish(a, "stop")
    s.add(seq("b", range(8)))
    assert plan(s.schedule()) == [("b", 4, 4, True)]  # block 2 must run: its last logits are needed


def test_abort_and_finish_free_blocks_and_a_stale_chunk_is_ignored():
    s, x, y, out = scheduled_pair(9, 5)
    assert s.allocator.num_used == 3 + 2
    s.finish(x, "abort")  # while the step "runs"
    assert s.allocator.num_used == 2 and x.finished and x not in s.running
    grew = s.update_from_output(out, fake_run(out))
    assert grew == [y] and x.tokens == list(range(9)) and x.num_computed == 0
    s.finish(y, "length")
    assert s.allocator.num_used == 0 and not s.has_work()


def test_failed_chunk_does_not_advance():
    s, x, y, out = scheduled_pair(3, 3)
    result = fake_run(out)
    result.failed["x"] = "boom"
    assert s.update_from_output(out, result) == [y] and x.num_computed == 0 and x.num_tokens == 3
