"""The runner's two step layouts: pure-decode steps as a `[B, 1]` batch padded to a bucket, other
steps flattened (padded when compiled). Padding must never change a real sequence's output or K/V,
and a compiled engine, once warmed, must not compile again whatever the concurrency."""

from __future__ import annotations

import pytest
import torch

from fmstack.backends import compile_counters
from fmstack.errors import ParameterError
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model
from fmstack.serve.engine import Engine, EngineConfig, RequestParams
from fmstack.serve.paged_cache import NULL_BLOCK, build_decode, decode_slots
from fmstack.serve.runner import ModelRunner, decode_buckets, padding_chunks
from tests.serve.test_engine import prompts, reference, run, tokens_of


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-gqa").model


def test_decode_buckets():
    assert decode_buckets(1) == (1,)
    assert decode_buckets(8) == (1, 2, 4, 8)
    assert decode_buckets(12) == (1, 2, 4, 8, 12)
    with pytest.raises(ParameterError, match="max_batch=0"):
        decode_buckets(0)


def test_padding_rows_touch_only_the_null_block():
    kv_slots = build_decode([(5, (3, 7)), (0, (2,))], block_size=4, batch=4)
    positions = torch.tensor([[5], [0], [0], [0]])
    assert decode_slots(kv_slots, positions).tolist() == [7 * 4 + 1, 2 * 4, NULL_BLOCK, NULL_BLOCK]
    assert kv_slots.shape == (4, 8)
    assert kv_slots[0].tolist() == list(range(12, 16)) + list(range(28, 32))
    assert kv_slots[2:].lt(4).all()  # padding rows read the null block only
    with pytest.raises(ValueError, match="do not fit"):
        build_decode([(0, (1,))] * 3, block_size=4, batch=2)
    sizes = lambda c: (c.n, len(c.block_table))  # noqa: E731
    for bs in (1, 2, 4, 5, 16):  # the warm-up's flattened step: every chunk on the null block
        chunks = padding_chunks(bs)
        assert all(set(c.block_table) == {NULL_BLOCK} and len(c.block_table) * bs >= c.start + c.n for c in chunks)
        assert [sizes(c)[0] for c in chunks][:3] == [1, 1, 1] and chunks[3].n == chunks[4].n + 1


def padded_runner(eng: Engine, buckets=(8,)) -> ModelRunner:
    return ModelRunner(eng.model, eng.cache, eng.runner.backends, buckets=buckets)


def test_a_padded_decode_step_equals_the_unpadded_one(tiny):
    """Same cache state, one decode step of 3 sequences, unpadded and padded to 8 rows: the same logits
    and the same K/V outside the null block."""
    eng = Engine(tiny, None, EngineConfig(block_size=4, num_blocks=60, max_model_len=64))
    for i, p in enumerate(prompts([5, 11, 8], seed=4)):
        eng.add_request(str(i), p, RequestParams(SamplingParams(max_new_tokens=4)), lambda o: None)
    eng.step()  # the prefills
    scheduled = eng.scheduler.schedule()
    assert len(scheduled.chunks) == 3 and all(c.n == 1 for c in scheduled.chunks)
    saved = [b.clone() for b in eng.cache.buffers()]
    plain = eng.runner.decode_logits(scheduled.chunks)
    after_plain = [b.clone() for b in eng.cache.buffers()]
    for b, s in zip(eng.cache.buffers(), saved):
        b.copy_(s)
    padded = padded_runner(eng).decode_logits(scheduled.chunks)
    assert padded.shape == plain.shape == (3, tiny.config.vocab_size)
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)
    real = slice(eng.cache.block_size, None)  # every slot but the null block's
    for b, ref in zip(eng.cache.buffers(), after_plain):
        torch.testing.assert_close(b[real], ref[real], rtol=1e-5, atol=1e-5)


def test_padded_layouts_give_the_solo_greedy_tokens(tiny):
    """Decode buckets and padded flattened steps (eager) through prefills, decodes and preemption."""
    ps = prompts([12, 14, 10, 16, 3], seed=3)
    ref = reference(tiny, ps, 20)
    eng = Engine(tiny, None, EngineConfig(block_size=4, num_blocks=17, max_num_batched_tokens=24, max_num_seqs=5,
                                          max_model_len=64, prefix_caching=False))
    eng.runner = padded_runner(eng, buckets=(2, 4, 8))
    outs, _ = run(eng, ps, RequestParams(SamplingParams(max_new_tokens=20)))
    assert eng.stats().preemptions > 0
    assert tokens_of(outs) == {str(i): r for i, r in enumerate(ref)}


def staggered(eng: Engine, seed: int = 0) -> dict[str, list[int]]:
    """Requests joining and leaving: 1, then 3, then 4 at once, lengths and budgets all different."""
    g = torch.Generator().manual_seed(seed)
    outs: dict[str, list[int]] = {}
    k = 0
    for wave in ([3], [5, 9, 2], [12, 30, 7, 4], [1]):
        for n in wave:
            p = torch.randint(0, 500, (n,), generator=g).tolist()
            eng.add_request(str(k), p, RequestParams(SamplingParams(max_new_tokens=3 + k % 5)),
                            lambda o: outs.setdefault(o.request_id, []).extend(o.token_ids))
            k += 1
            eng.step()
        eng.step()
    while eng.has_work():
        eng.step()
    return outs


def test_a_warmed_compiled_engine_does_not_compile_again(tiny):
    """Warm-up compiles one decode graph per bucket and one flattened graph; then concurrency going
    1 -> 4 -> 1 with prefills and decodes mixed builds no graph (Dynamo's graphs, eager backend:
    recompiles are decided by Dynamo's guards, whatever backend builds the graph)."""
    torch.compiler.reset()
    cfg = dict(block_size=4, num_blocks=120, max_num_batched_tokens=24, max_num_seqs=4, max_model_len=64)
    eng = Engine(tiny, None, EngineConfig(**cfg, compile=True, compile_cache=False, compile_backend="eager"))
    before = compile_counters()["graphs"]
    assert eng.warm_up("all") == [1, 2, 4]
    assert compile_counters()["graphs"] - before == 4
    warmed = compile_counters()["graphs"]
    outs = staggered(eng)
    assert compile_counters()["graphs"] == warmed
    assert outs == staggered(Engine(tiny, None, EngineConfig(**cfg)))


def test_warm_up_choices(tiny):
    eng = Engine(tiny, None, EngineConfig(block_size=4, num_blocks=20, max_model_len=64))
    assert eng.warm_up("all") == []  # eager: nothing to compile
    with pytest.raises(ParameterError, match="warmup='some'"):
        eng.warm_up("some")


@pytest.mark.slow
def test_compiled_engine_equals_eager_engine(tiny):
    """The real compiled path (the decode backend, Inductor): a mixed workload with preemption gives
    the eager engine's greedy tokens."""
    torch.compiler.reset()
    ps = prompts([12, 14, 10, 16, 3], seed=3)
    cfg = dict(block_size=4, num_blocks=17, max_num_batched_tokens=24, max_num_seqs=4, max_model_len=64,
               prefix_caching=False)
    eager, _ = run(Engine(tiny, None, EngineConfig(**cfg)), ps, RequestParams(SamplingParams(max_new_tokens=20)))
    eng = Engine(tiny, None, EngineConfig(**cfg, compile=True, compile_cache=False))
    compiled, _ = run(eng, ps, RequestParams(SamplingParams(max_new_tokens=20)))
    assert eng.stats().preemptions > 0
    assert tokens_of(compiled) == tokens_of(eager)


def test_serve_compiles_by_default_and_no_compile_stays(monkeypatch):
    from fmstack.cli import build_parser
    from fmstack.commands.common import want_compile

    monkeypatch.setenv("FMSTACK_COMPILE", "1")  # as for a user (the test session turns the default off)
    parser = build_parser()
    assert want_compile(parser.parse_args(["serve"])) is True
    assert want_compile(parser.parse_args(["serve", "--no-compile"])) is False
    assert parser.parse_args(["serve"]).warmup == "cached"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--warmup", "some"])


def test_both_engine_steps_trace_one_block_for_every_layer(tiny):
    """The paged caches hand the model per-layer views (`PagedKVCache.decoding` / `stepping`): the
    compiled decode and flattened steps each call one traced block graph for all layers (what makes a
    bucket compile in seconds, not minutes), with no graph break, and equal the eager engine."""
    graphs = []

    def record(gm, example_inputs):  # no Inductor: what Dynamo traced, run as traced
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    cfg = dict(block_size=4, num_blocks=60, max_num_batched_tokens=24, max_num_seqs=2, max_model_len=64)
    eng = Engine(tiny, None, EngineConfig(**cfg, compile=True, compile_cache=False, compile_backend=record))
    eng.warm_up("all")
    assert len(graphs) == 3  # buckets 1, 2 and the flattened step
    for gm in graphs:
        calls = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        assert len(calls) == tiny.config.n_layers
        assert len({n.args[0].target for n in calls}) == 1
    ps = prompts([9, 5, 12], seed=4)
    params = RequestParams(SamplingParams(max_new_tokens=6))
    compiled, _ = run(eng, ps, params)
    assert len(graphs) == 3  # no recompile: other key lengths, batch sizes and chunk layouts
    assert tokens_of(compiled) == tokens_of(run(Engine(tiny, None, EngineConfig(**cfg)), ps, params)[0])
