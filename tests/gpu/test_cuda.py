"""CUDA checks on tiny models; run on a GPU machine with `python -m pytest -m cuda tests/gpu -q`
(deselected by default, skipped without CUDA). Nothing here has run on a GPU yet: see docs/gpu.md.

- compiled decode (mode reduce-overhead: CUDA graphs): no graph breaks, no recompiles and no
  re-recorded CUDA graphs over 20 decode steps and 3 prompt lengths; tokens equal to eager
- every SDPA backend (`sdpa_backend` option) against math, bf16 and fp16, plain causal and through
  the static KV cache (boolean mask), MHA and GQA; a backend is skipped only when the op itself
  says it cannot run those inputs ("No available kernel"), with its reasons
- int8 / int4 kernels (fmstack.quant.ops) against a float64 dequantized reference
- CUDA logits (fp32, bf16) against a CPU float64 copy of the same weights
- batched greedy == single greedy (eager and compiled); a decode step makes no host sync

Errors are relative Frobenius norms ||out - ref|| / ||ref|| (`rel_err`); each test states its bound.
"""

import copy
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.nn.attention import sdpa_kernel

from fmstack.config import ModelConfig
from fmstack.errors import ParameterError
from fmstack.generation.generate import Generator, sdpa_backends
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.generation.sampling import SamplingParams, exponential_noise, sampling_tensors
from fmstack.loading import DTYPES, load_model
from fmstack.models.build import build_model
from fmstack.quant import QuantSpec, rtn_portable
from fmstack.quant import ops
from fmstack.quant.linear import Int4Linear, Int8Linear, dequantize_int4, quantize_int8

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = torch.device("cuda")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm()).item()


def cuda_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    return g


@pytest.fixture(scope="module")
def tiny():
    """random:tiny-gqa (GQA, Llama-3.1 RoPE scaling, untied) in fp32, built on the GPU."""
    return load_model("random:tiny-gqa", device="cuda", dtype="fp32", seed=0).model


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full fp32 (the default, made explicit) for the float64 comparisons."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# -- compiled decode with CUDA graphs ---------------------------------------------------------------

def cudagraph_nodes() -> int | None:
    """CUDA graphs recorded so far by Inductor's cudagraph trees on this device (None: no tree manager,
    i.e. nothing ran under CUDA graphs)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    if manager is None:
        return None

    def count(nodes_by_function) -> int:
        return sum(1 + count(node.children) for nodes in nodes_by_function.values() for node in nodes)

    return count(manager.roots)


@pytest.fixture(scope="module")
def compiled_runs(tiny):
    """Warm up (compile, record the CUDA graph) on one prompt length, then 3 other lengths x 20 decode
    steps with recompiles turned into errors; record graph breaks, graphs and CUDA-graph recordings."""
    torch._dynamo.reset()
    counters.clear()
    nodes_before = cudagraph_nodes() or 0
    gen = Generator(tiny, eos_ids=[], compile=True, max_seq_len=64)
    assert gen.compiled
    params = SamplingParams(max_new_tokens=21)  # the prefill's token + 20 decode steps
    gen.generate([[1, 2, 3, 4]], params)  # compiles prefill (symbolic length) and decode (CUDA graph)
    warm_graphs, warm_nodes = counters["stats"]["unique_graphs"], cudagraph_nodes()
    outs = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (5, 9, 17):
            outs[n] = gen.generate([list(range(10, 10 + n))], params)[0].token_ids
    torch.cuda.synchronize()
    return dict(outs=outs, params=params, graph_breaks=dict(counters["graph_break"]), warm_graphs=warm_graphs,
                graphs_after=counters["stats"]["unique_graphs"], nodes_before=nodes_before, warm_nodes=warm_nodes,
                nodes_after=cudagraph_nodes(), cudagraph_skips=counters["inductor"]["cudagraph_skips"])


def test_compiled_decode_has_zero_graph_breaks(compiled_runs):
    assert compiled_runs["graph_breaks"] == {}


def test_compiled_decode_no_recompiles_across_steps_and_prompt_lengths(compiled_runs):
    assert compiled_runs["warm_graphs"] == 2  # prefill + decode
    assert compiled_runs["graphs_after"] == compiled_runs["warm_graphs"]


def test_decode_runs_as_one_cuda_graph(compiled_runs):
    """reduce-overhead really captured the decode step (Inductor skipped nothing) and replayed it: no
    re-recording over 60 more decode steps."""
    assert compiled_runs["cudagraph_skips"] == 0, "Inductor skipped CUDA graphs (see TORCH_LOGS=perf_hints)"
    assert compiled_runs["warm_nodes"] is not None, "no cudagraph tree manager: decode did not run as a CUDA graph"
    assert compiled_runs["warm_nodes"] - compiled_runs["nodes_before"] >= 1
    assert compiled_runs["nodes_after"] == compiled_runs["warm_nodes"]


def test_compiled_tokens_equal_eager_on_cuda(tiny, compiled_runs):
    eager = Generator(tiny, eos_ids=[], max_seq_len=64)
    for n, ids in compiled_runs["outs"].items():
        assert len(ids) == 21
        assert ids == eager.generate([list(range(10, 10 + n))], compiled_runs["params"])[0].token_ids


# -- SDPA backends ----------------------------------------------------------------------------------

SDPA_CONFIGS = {  # head_dim 64, what the fused kernels are built for
    "mha": ModelConfig(name="sdpa-mha", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=512,
                       max_seq_len=256),
    "gqa": ModelConfig(name="sdpa-gqa", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512,
                       max_seq_len=256),
}
SDPA_B, SDPA_PREFILL, SDPA_STEPS = 2, 24, 3


@pytest.fixture(scope="module")
def sdpa_model():
    built = {}

    def get(kind: str, dtype: str):
        if (kind, dtype) not in built:
            model = build_model(SDPA_CONFIGS[kind], DEV, DTYPES[dtype])
            model.init_weights(std=0.05, generator=cuda_generator(0))  # peaked enough that attention matters
            built[kind, dtype] = model.eval().requires_grad_(False)
        return built[kind, dtype]

    return get


def sdpa_inputs():
    tokens = torch.randint(0, 512, (SDPA_B, SDPA_PREFILL + SDPA_STEPS), generator=torch.Generator().manual_seed(0))
    return tokens.to(DEV), torch.tensor([0, 5], device=DEV)  # row 1 left-padded by 5


def logits_causal(model, backend: str, tokens):
    """Plain causal attention (no cache: is_causal=True, no mask)."""
    with torch.inference_mode(), sdpa_kernel(sdpa_backends(backend, DEV)):
        return model(tokens)


def logits_cached(model, backend: str, tokens, pad):
    """Through the static KV cache (boolean mask) with `Generator(sdpa_backend=...)`: a prefill, then
    single-token steps, teacher-forced so every backend sees the same inputs."""
    gen = Generator(model, eos_ids=[], sdpa_backend=backend)
    cache = gen.ensure_cache(SDPA_B, tokens.shape[1])
    cache.reset(pad)
    with torch.inference_mode():
        pos = torch.arange(SDPA_PREFILL, device=DEV)[None] - pad[:, None]
        out = [gen.logits(tokens[:, :SDPA_PREFILL], pos, cache)]
        for i in range(SDPA_PREFILL, tokens.shape[1]):
            out.append(gen.logits(tokens[:, i:i + 1], (i - pad)[:, None], cache))
    return torch.cat(out, dim=1)


def run_or_skip(backend: str, fn):
    """fn(), or a skip naming the op's own reasons when SDPA says the backend cannot run these inputs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn()
        except RuntimeError as e:
            if "No available kernel" not in str(e):
                raise
            reasons = " | ".join(dict.fromkeys(str(w.message).strip() for w in caught)) or str(e)
    pytest.skip(f"SDPA backend {backend!r} says it cannot run these inputs: {reasons[:1500]}")


@pytest.mark.parametrize("path", ["causal", "cached"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("dtype, tol", [("bf16", 2e-2), ("fp16", 5e-3)])
@pytest.mark.parametrize("backend", ["auto", "flash", "efficient", "cudnn"])
def test_sdpa_backend_matches_math(sdpa_model, backend, dtype, tol, kind, path):
    model = sdpa_model(kind, dtype)
    tokens, pad = sdpa_inputs()
    if path == "cached" and backend == "flash":  # the cache masks; CUDA flash takes no mask: refused up front
        with pytest.raises(ParameterError, match="--sdpa-backend flash cannot attend through the KV cache"):
            logits_cached(model, backend, tokens, pad)
        return
    if path == "causal":
        def run(b):
            return logits_causal(model, b, tokens)
    else:
        def run(b):
            return logits_cached(model, b, tokens, pad)
    ref = run("math")
    got = run_or_skip(backend, lambda: run(backend))
    err = rel_err(got, ref)
    assert err < tol, f"{backend} vs math ({dtype}, {kind}, {path}): rel err {err:.2e}, bound {tol:.0e}"


# -- quantized kernels ------------------------------------------------------------------------------

def test_native_quant_kernels_registered_for_cuda():
    """On CUDA int8 goes through `F.linear(x, w.to(x.dtype)) * scales` under Inductor (the native
    `_weight_int8pack_mm` CUDA kernel is a naive one); int4 takes the native tinygemm path (sm80+),
    whose kernels must be registered for CUDA."""
    from fmstack.backends import has_kernel

    assert ops.int8_kernel(DEV) == "linear"
    assert ops.has_native_int4(DEV)
    assert has_kernel("_weight_int4pack_mm", DEV) and has_kernel("_convert_weight_to_int4pack", DEV)


@pytest.mark.parametrize("m", [1, 5, 32])
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("bf16", 1e-2), ("fp16", 2e-3)])
def test_int8_kernel_matches_dequantized_reference(dtype, tol, m):
    g = cuda_generator(1)
    w = torch.randn(384, 256, device=DEV, generator=g)
    q, s = quantize_int8(w)
    lin = Int8Linear.from_portable(q, s, DTYPES[dtype])
    x = torch.randn(m, 2, 256, device=DEV, generator=g).to(DTYPES[dtype])
    ref = x.double() @ (q.double() * lin.scales.double()[:, None]).T  # the module's own (rounded) scales
    got = lin(x)
    assert got.dtype == x.dtype and got.shape == (m, 2, 384)
    err = rel_err(got, ref)
    assert err < tol, f"int8 {dtype} M={m}: rel err {err:.2e}, bound {tol:.0e}"
    strided = x[:, 1:]  # a last-position slice, as decode passes it: not contiguous
    assert torch.equal(lin(strided), lin(strided.contiguous()))


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "fallback"])
def test_int4_kernel_matches_dequantized_reference(monkeypatch, native, dtype, group, m):
    """The CUDA tinygemm packer/matmul (or the dequantize fallback) computes x @ deq(W).T with
    deq = (q - 8) * scale + zero, in the kernel's own bf16 scales/zeros. Bound 1e-2 (bf16 weights and
    output); a wrong nibble order or zero convention gives errors near 1."""
    if not native:
        monkeypatch.setattr(ops, "has_native_int4", lambda device: False)
    g = cuda_generator(2)
    w = torch.randn(256, 512, device=DEV, generator=g)
    t = rtn_portable(w, QuantSpec("int4", group))
    lin = Int4Linear.from_portable(t["qweight"], t["scales"], t["zeros"], group, DTYPES[dtype])
    if native:
        assert lin.weight.dtype == torch.int32  # tinygemm's packed layout, not the uint8 fallback
    sz = lin.scales_and_zeros.double()  # [K/G, N, 2]
    deq = dequantize_int4(ops.unpack_uint4(t["qweight"]), sz[..., 0].T, sz[..., 1].T, group)
    x = torch.randn(m, 512, device=DEV, generator=g).to(DTYPES[dtype])
    got = lin(x)
    assert got.dtype == x.dtype
    err = rel_err(got, x.double() @ deq.double().T)
    assert err < 1e-2, f"int4 {'native' if native else 'fallback'} {dtype} g{group} M={m}: rel err {err:.2e}"


@pytest.mark.parametrize("mode, tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_tiny_model_on_cuda(mode, tol):
    """A quantized bf16 model stays near its float model (the CPU suite's bounds), and its compiled
    forward (Inductor around the native kernels) equals eager within 1e-2."""
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEV)
    float_model = load_model("random:tiny-gqa", device="cuda", dtype="bf16", seed=0).model
    qmodel = load_model("random:tiny-gqa", device="cuda", dtype="bf16", seed=0, quantize=mode).model
    with torch.inference_mode():
        ref = float_model(tokens)
        eager = qmodel(tokens)
        compiled = torch.compile(qmodel, fullgraph=True)(tokens)
    err = rel_err(eager, ref)
    assert err < tol, f"{mode} vs float: rel err {err:.3f}, bound {tol}"
    err = rel_err(compiled, eager)
    assert err < 1e-2, f"{mode} compiled vs eager: rel err {err:.2e}"


# -- CUDA vs a CPU float64 reference ------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("bf16", 3e-2)])
@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa"])
def test_cuda_logits_match_cpu_float64(no_tf32, name, dtype, tol):
    """Same weights (the CUDA model's, copied to a float64 CPU model: exact for fp32 and bf16), plain
    causal and through the static cache (16-token prefill + 8 single steps). Bounds: fp32 1e-4 (below
    TF32's ~3e-4), bf16 3e-2 (bf16 activations; ~1e-2 measured on the CPU)."""
    model = load_model(f"random:{name}", device="cuda", dtype=dtype, seed=0).model
    g = cuda_generator(3)
    with torch.no_grad():  # sharper attention than the default std 0.02, and norms that are not all ones
        model.init_weights(std=0.06, generator=g)
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=g)
    ref = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref(tokens)
        full = model(tokens.to(DEV))
        cache = StaticKVCache(cfg, 2, 64, dtype=DTYPES[dtype], device=DEV)
        cache.reset()
        pos = torch.arange(24, device=DEV).expand(2, -1)
        toks = tokens.to(DEV)
        parts = [model(toks[:, :16], pos[:, :16], cache)]
        parts += [model(toks[:, i:i + 1], pos[:, i:i + 1], cache) for i in range(16, 24)]
        cached = torch.cat(parts, dim=1)
    for label, out in (("causal", full), ("cached", cached)):
        err = rel_err(out, expected)
        assert err < tol, f"{name} {dtype} {label} vs CPU float64: rel err {err:.2e}, bound {tol:.0e}"


# -- generation loop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_batched_greedy_equals_single_on_cuda(tiny, compiled):
    gen = Generator(tiny, eos_ids=[], compile=compiled, max_seq_len=64)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [400, 3], [11, 12, 13, 14, 15]]  # left-padded in the batch
    params = [SamplingParams(max_new_tokens=n) for n in (10, 6, 8)]
    batched = gen.generate(prompts, params)
    for p, sp, res in zip(prompts, params, batched):
        assert len(res.token_ids) == sp.max_new_tokens
        assert res.token_ids == gen.generate([p], sp)[0].token_ids


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_decode_step_makes_no_host_sync(tiny, greedy):
    """One eager decode step (forward through the cache + sampling, noise included) with CUDA's sync
    debug mode set to error: any .item()/.tolist()/nonzero-style synchronisation raises."""
    gen = Generator(tiny, eos_ids=[], max_seq_len=64)
    B, V = 2, tiny.config.vocab_size
    cache = gen.ensure_cache(B, 64)
    cache.reset(torch.tensor([0, 2], device=DEV))
    params = [SamplingParams(temperature=0.0) if greedy else SamplingParams(temperature=0.8, top_k=50, top_p=0.9,
                                                                            seed=7 + i) for i in range(B)]
    temperature, top_k, top_p = sampling_tensors(params, DEV)
    row_generators = [gen._generator(p.seed) for p in params]
    tokens = torch.tensor([[5], [7]], device=DEV)
    positions = torch.tensor([[3], [1]], device=DEV)

    def step():
        noise = None if greedy else exponential_noise((B, V), row_generators, DEV)
        return gen._decode_impl(tokens, positions, cache, temperature, top_k, top_p, noise)

    with torch.inference_mode():
        step()  # first calls may initialise handles (and sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (B,) and out.dtype == torch.long


# -- the serving engine's compiled paged step; speculative decoding ---------------------------------
# The bodies take the device (and whether to compile) so that the same logic can be checked on the CPU:
#   python -c "from tests.gpu.test_cuda import *; check_engine_compiled_step('cpu', False)"

def engine_prompts(lengths, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run_engine(engine, prompt_list, max_new: int) -> dict[str, list[int]]:
    """Every prompt through `engine.step()` (no thread) until done: request id -> generated token ids."""
    from fmstack.serve.engine import RequestParams

    outs: dict[str, list[int]] = {}

    def collect(o):
        outs.setdefault(o.request_id, []).extend(o.token_ids)

    for i, p in enumerate(prompt_list):
        engine.add_request(str(i), p, RequestParams(SamplingParams(max_new_tokens=max_new)), collect)
    while engine.has_work():
        engine.step()
    return outs


def check_engine_compiled_step(device: str, compile: bool = True) -> None:
    """The engine's paged step (compiled: torch.compile(fullgraph=True) over mixed prefill + decode
    batches with dynamic token counts) gives the tokens plain greedy `Generator` gives each prompt
    alone, with no graph break; a second wave of requests with other tokens but the same lengths (so
    the same schedule) compiles nothing new. (Other lengths and request counts may compile new graphs:
    the attention groups of a step are a Python list, one graph per group count.)"""
    from fmstack.serve.engine import Engine, EngineConfig

    model = load_model("random:tiny-gqa", device=device, dtype="fp32", seed=0).model
    ref_gen = Generator(model, eos_ids=[])
    first, second = engine_prompts([9, 21, 14], 13, 512), engine_prompts([9, 21, 14], 14, 512)
    ref = {str(i): ref_gen.generate([p], SamplingParams(max_new_tokens=6))[0].token_ids
           for i, p in enumerate(first)}
    torch._dynamo.reset()
    counters.clear()
    eng = Engine(model, None, EngineConfig(block_size=4, num_blocks=80, max_num_batched_tokens=16,
                                           max_model_len=128, compile=compile))
    assert run_engine(eng, first, 6) == ref
    warm_graphs = counters["stats"]["unique_graphs"]
    ref2 = {str(i): ref_gen.generate([p], SamplingParams(max_new_tokens=6))[0].token_ids
            for i, p in enumerate(second)}
    assert run_engine(eng, second, 6) == ref2
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == warm_graphs, "the same schedule compiled again"
    if compile:
        assert warm_graphs >= 1


def test_engine_compiled_paged_step_on_cuda():
    check_engine_compiled_step("cuda")


def check_speculative(device: str, compile: bool = True) -> None:
    """Greedy speculative decoding (compiled target and draft) gives exactly the target's greedy tokens,
    with an int8 draft and with the target as its own draft (which must accept every proposal but
    for float noise between its 1-token and k-token forwards)."""
    from fmstack.generation.speculative import SpeculativeGenerator

    target = load_model("random:tiny-gqa", device=device, dtype="fp32", seed=0).model
    draft8 = load_model("random:tiny-gqa", device=device, dtype="fp32", seed=0, quantize="int8").model
    tgt = Generator(target, eos_ids=[], compile=compile)
    prompt = engine_prompts([12], 3, 512)[0]
    params = SamplingParams(max_new_tokens=24)
    ref = Generator(target, eos_ids=[]).generate([prompt], params)[0].token_ids
    for draft_model, min_rate in ((draft8, 0.0), (target, 0.9)):
        spec = SpeculativeGenerator(tgt, Generator(draft_model, eos_ids=[], compile=compile), 4)
        res = spec.generate(prompt, params)
        assert res.token_ids == ref
        assert res.rounds > 0 and res.proposed > 0 and res.acceptance_rate >= min_rate, res


def test_speculative_decoding_compiled_on_cuda():
    check_speculative("cuda")
