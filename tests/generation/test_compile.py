"""Compiled generation: zero graph breaks, no recompiles over decode steps and prompt lengths,
compiled == eager. Tiny model; compile costs ~1 min on 2 cores, so one module-scoped generator."""

import pytest
import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config
from torch._dynamo.utils import counters

from fmstack.errors import ParameterError
from fmstack.generation.generate import Generator, sdpa_backends
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-gqa", seed=0).model


@pytest.fixture(scope="module")
def compiled_runs(tiny):
    """Warm up (compile) on one prompt length, then run 3 other lengths x 20 decode steps with
    recompiles turned into errors; record graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    gen = Generator(tiny, eos_ids=[], compile=True, max_seq_len=64)
    params = SamplingParams(max_new_tokens=20)
    gen.generate([[1, 2, 3, 4]], params)  # compiles prefill (dynamic length) and decode
    warm_graphs = counters["stats"]["unique_graphs"]
    loaded = gen._decode_step.background_builds > 0  # the decode step built by a background process, then loaded
    outs = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (5, 9, 17):
            prompt = list(range(10, 10 + n))
            outs[n] = gen.generate([prompt], params)[0].token_ids
    return dict(outs=outs, graph_breaks=dict(counters["graph_break"]), warm_graphs=warm_graphs,
                graphs_after=counters["stats"]["unique_graphs"], decode_loaded=loaded)


def test_zero_graph_breaks(compiled_runs):
    assert compiled_runs["graph_breaks"] == {}


def test_no_recompiles_across_steps_and_prompt_lengths(compiled_runs):
    # prefill + decode, the decode step traced in a background process where the cache saves steps whole
    assert compiled_runs["warm_graphs"] == (1 if compiled_runs["decode_loaded"] else 2)
    assert compiled_runs["graphs_after"] == compiled_runs["warm_graphs"]


def test_compiled_tokens_equal_eager(tiny, compiled_runs):
    eager = Generator(tiny, eos_ids=[], max_seq_len=64)
    for n, ids in compiled_runs["outs"].items():
        assert ids == eager.generate([list(range(10, 10 + n))], SamplingParams(max_new_tokens=20))[0].token_ids


def test_a_second_batch_size_compiles_in_the_same_process(tiny):
    """Batch 1 then batch 3 through one compiled generator: the prefill graph stays static in the batch
    (a dynamic batch, Dynamo's automatic choice on the recompile, crashed torch 2.13's re-trace of the
    compile region: InternalTorchDynamoError KeyError in stamp_out_subgraph), tokens equal eager."""
    torch._dynamo.reset()
    gen = Generator(tiny, eos_ids=[], compile=True, max_seq_len=64)
    eager = Generator(tiny, eos_ids=[], max_seq_len=64)
    params = SamplingParams(max_new_tokens=4)
    for prompts in ([[1, 2, 3, 4]], [[5, 6, 7], [8, 9, 10], [11, 12, 13]]):
        assert [r.token_ids for r in gen.generate(prompts, params)] == \
            [r.token_ids for r in eager.generate(prompts, params)]


def test_compiled_logits_equal_eager(tiny):
    torch._dynamo.reset()
    tokens = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny(tokens)
        got = torch.compile(tiny, fullgraph=True)(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_blocks_compile_as_one_region_reused_for_every_layer(tiny):
    """With the static cache every block is a call of one traced region (the layer's K/V are inputs,
    not an index): Dynamo traces the block once, and the graph equals eager, cache writes included."""
    from fmstack.generation.kv_cache import StaticKVCache

    graphs = []

    def record(gm, example_inputs):  # no Inductor: what Dynamo traced, run as traced
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    tokens = torch.tensor([[5, 6, 7]])
    positions = torch.arange(3)[None]
    caches = [StaticKVCache(tiny.config, 1, 16) for _ in range(2)]
    with torch.no_grad():
        got = torch.compile(tiny, backend=record, fullgraph=True)(tokens, positions, caches[0])
        expected = tiny(tokens, positions, caches[1])
    [gm] = graphs
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == tiny.config.n_layers
    assert len({n.args[0].target for n in calls}) == 1  # one block graph, called for each layer
    torch.testing.assert_close(got, expected)
    for layer in range(tiny.config.n_layers):
        torch.testing.assert_close(caches[0].layer_kv(layer), caches[1].layer_kv(layer))


def test_sdpa_backend_validation():
    assert len(sdpa_backends("auto", torch.device("cpu"))) == 4
    with pytest.raises(ParameterError, match="needs CUDA"):
        sdpa_backends("efficient", torch.device("cpu"))
    with pytest.raises(ParameterError, match="unknown"):
        sdpa_backends("fast", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_cpu_sdpa_backends_give_same_tokens(tiny, backend):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = Generator(tiny, eos_ids=[]).generate([prompt], SamplingParams(max_new_tokens=8))[0].token_ids
    got = Generator(tiny, eos_ids=[], sdpa_backend=backend).generate([prompt], SamplingParams(max_new_tokens=8))
    assert got[0].token_ids == ref


def test_batch1_decode_reductions_equal_blas(tiny):
    """The CPU decode backend lowers batch-1 matmuls to streaming reductions: same logits as eager BLAS."""
    from fmstack.backends import decode_compile_kwargs

    assert decode_compile_kwargs("cpu")["backend"].__name__.startswith("inductor_cpu_gemv")
    torch._dynamo.reset()
    gen = Generator(tiny, eos_ids=[], compile=True, max_seq_len=64)
    eager = Generator(tiny, eos_ids=[], max_seq_len=64)
    prompt = torch.tensor([[5, 7, 11, 13, 17, 19]])
    pos = torch.arange(6)[None]
    with torch.inference_mode():
        for g in (gen, eager):
            g.ensure_cache(1, 64).reset()
            g.logits(prompt, pos, g.cache)
        for step in range(3):
            tok, p = torch.tensor([[23 + step]]), torch.tensor([[6 + step]])
            torch.testing.assert_close(gen.logits(tok, p, gen.cache), eager.logits(tok, p, eager.cache),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_few_row_matmul_reduction_equals_blas(rows, monkeypatch):
    """The decode backend lowers an `[M, K] @ [K, N]` of up to GEMV_MAX_ROWS rows (here with a
    pointwise producer) to per-row reductions, more rows to BLAS; both equal eager BLAS."""
    from fmstack.backends import inductor as gc

    lowered = []
    real_rowwise = gc.rowwise
    monkeypatch.setattr(gc, "rowwise", lambda fn, x: lowered.append(x.shape[0]) or real_rowwise(fn, x))
    torch._dynamo.reset()
    w = torch.randn(96, 64)
    x = torch.randn(rows, 64)
    fn = torch.compile(lambda v: torch.nn.functional.silu(v) @ w.T, **gc.decode_compile_kwargs("cpu"))
    # a cold compile: the on-disk caches (keyed for our backend) would hand back an earlier run's build
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got = fn(x)
    torch.testing.assert_close(got, torch.nn.functional.silu(x) @ w.T, rtol=1e-5, atol=1e-5)
    assert lowered == ([rows] if rows <= gc.GEMV_MAX_ROWS else [])


def test_collective_graphs_are_detected():
    """Graphs with functional collectives (tensor parallel) compile without the C++ wrapper, which
    cannot call them; other graphs keep it."""
    import torch.fx as fx
    from fmstack.backends.inductor import has_collectives as _has_collectives

    plain = fx.symbolic_trace(lambda v: torch.relu(v) + 1)
    assert not _has_collectives(plain)
    graph = fx.Graph()
    v = graph.placeholder("v")
    r = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (v, "sum", "0"))
    graph.output(graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (r,)))
    assert _has_collectives(fx.GraphModule(torch.nn.Module(), graph))


def test_generators_of_different_models_do_not_share_graphs(tiny):
    """The compiled decode skips guards on the model's attributes, so each Generator must get its own
    graphs: a float and an int8 copy of one model, compiled in one process, each match their eager run."""
    import copy

    from fmstack.quant import QuantSpec, quantize_model

    torch._dynamo.reset()
    q8 = quantize_model(copy.deepcopy(tiny), QuantSpec("int8"))
    other = load_model("random:tiny-gqa", seed=1).model
    prompt, params = [[7, 8, 9, 10, 11]], SamplingParams(max_new_tokens=12)
    compiled = [Generator(m, eos_ids=[], compile=True, max_seq_len=64) for m in (tiny, q8, other)]
    got = [g.generate(prompt, params)[0].token_ids for g in compiled]
    got += [g.generate(prompt, params)[0].token_ids for g in compiled]  # and again, interleaved
    want = [Generator(m, eos_ids=[], max_seq_len=64).generate(prompt, params)[0].token_ids
            for m in (tiny, q8, other)]
    assert got == want + want
    assert want[0] != want[2]  # the two float models really differ


def test_recompile_limit_is_raised_only_while_a_compiled_generator_runs(tiny, monkeypatch):
    """Every Generator compiles the same methods; their graphs share dynamo's per-function limit.
    Constructing a Generator changes no process-wide setting; `generate` raises the limit while it
    runs (when it compiles) and restores it after."""
    from fmstack.backends import RECOMPILE_LIMIT

    seen = []
    with torch._dynamo.config.patch(recompile_limit=8):
        gen = Generator(tiny, eos_ids=[], max_seq_len=64)
        compiled = Generator(tiny, eos_ids=[], compile=True, max_seq_len=64)
        assert torch._dynamo.config.recompile_limit == 8
        for g in (gen, compiled):
            monkeypatch.setattr(g, "_prefill", lambda *a: seen.append(torch._dynamo.config.recompile_limit)
                                or torch.zeros(1, dtype=torch.long))
            g.generate([[1, 2, 3]], SamplingParams(max_new_tokens=1))
        assert seen == [8, RECOMPILE_LIMIT]
        assert torch._dynamo.config.recompile_limit == 8


class _ReuseRecorder:
    """Wraps model steps: keeps every output (so no storage is recycled) and notes each call that
    receives a tensor sharing storage with an earlier output. A CUDA-graphed step's outputs are
    overwritten or freed by its next replay (pytorch issue 152887), so none may be fed back in."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.reused: list[str] = []
        self.calls = 0

    def wrap(self, name, step):
        def run(*args):
            self.calls += 1
            earlier = {o.untyped_storage().data_ptr() for o in self.outputs}
            self.reused += [f"{name} arg {i}" for i, a in enumerate(args)
                            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in earlier]
            out = step(*args)
            self.outputs.append(out)
            return out
        return run


@pytest.mark.parametrize("prompts", [[[7]], [[1, 2, 3], [4, 5]]], ids=["one-token-prefill", "batch2"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_decode_loop_never_feeds_a_step_output_back(tiny, prompts, temperature):
    gen = Generator(tiny, eos_ids=[], max_seq_len=64)
    rec = _ReuseRecorder()
    gen._prefill_step = rec.wrap("prefill", gen._prefill_step)
    gen._decode_step = rec.wrap("decode", gen._decode_step)
    gen.generate(prompts, SamplingParams(max_new_tokens=6, temperature=temperature, seed=0))
    assert rec.calls == 6 and rec.reused == []


def test_speculative_decoding_never_feeds_a_step_output_back(tiny):
    from fmstack.generation.speculative import SpeculativeGenerator

    target = Generator(tiny, eos_ids=[], max_seq_len=64)
    draft = Generator(load_model("random:tiny-gqa", seed=1).model, eos_ids=[], max_seq_len=64)
    rec = _ReuseRecorder()
    for name, g in (("target", target), ("draft", draft)):
        g._logits_few = rec.wrap(f"{name} few", g._logits_few)
        g._logits_many = rec.wrap(f"{name} many", g._logits_many)
    SpeculativeGenerator(target, draft, 3).generate([5, 6, 7], SamplingParams(max_new_tokens=12))
    assert rec.calls > 4 and rec.reused == []


def test_generate_eval_and_bench_compile_by_default(monkeypatch):
    """Compiled is the default of the commands (CPU included); --no-compile and $FMSTACK_COMPILE=0 turn it
    off. (The test session sets FMSTACK_COMPILE=0: one-off compiles in every CLI test would cost minutes.)"""
    from fmstack.cli import build_parser

    monkeypatch.delenv("FMSTACK_COMPILE", raising=False)
    parser = build_parser()
    for argv in (["generate", "hi"], ["eval", "perplexity", "--text", "t.txt"],
                 ["eval", "hellaswag", "--data", "d.jsonl"], ["bench"]):
        assert parser.parse_args(argv).compile is True, argv
    assert parser.parse_args(["generate", "--no-compile", "hi"]).compile is False
    monkeypatch.setenv("FMSTACK_COMPILE", "0")
    assert build_parser().parse_args(["generate", "hi"]).compile is False
    assert build_parser().parse_args(["generate", "--compile", "hi"]).compile is True
