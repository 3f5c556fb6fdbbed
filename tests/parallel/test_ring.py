"""Context parallel (ring attention, sharded KV cache) vs the single-process model.

Unit tests check the online-softmax pieces against full softmax attention. The multi-process tests
run one torchrun job (gloo) per world size over tiny MHA, GQA and Mixtral-MoE checkpoints: ring-prefill logits for
lengths below, at and above 2N and not divisible by N; prefill + decode logits step by step through
the sharded cache with a left-padded batch; greedy generation; scoring. Tolerance: fp32 logits
within 1e-5 (the ring sums per-block softmax partials in another order than one fused softmax;
observed ~1e-6 for O(1) logits), scores within 1e-4, greedy tokens identical.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fmstack.models.llama import sdpa
from fmstack.parallel.ring import ZigZag, merge_partials, merge_stacked, partial_attention, visible
from tests.parallel.conftest import PROMPT, WORKER, generate_cli, reference_ids, torchrun

CASES = ["mha", "gqa", "moe"]


# -- unit tests: online softmax and layout -----------------------------------------------------
def _qkv(B=2, H=8, Hkv=2, T=29, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


@pytest.mark.parametrize("hkv", [8, 2, 1])
def test_blockwise_merge_equals_full_softmax(hkv):
    """Random key blocks (uneven, one empty, in shuffled order) merged online == one causal softmax."""
    q, k, v = _qkv(Hkv=hkv)
    T = q.shape[2]
    cols = torch.arange(T)
    ref = sdpa(q, k, v, is_causal=True)
    scores = (q.reshape(2, hkv, -1, T, 16) @ k[:, :, None].transpose(-1, -2)) / 4.0
    ref_lse = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).logsumexp(-1).reshape(2, 8, T)
    bounds = [(17, 29), (0, 5), (5, 5), (5, 17)]
    acc = None
    for s, e in bounds:
        part = partial_attention(q, k[:, :, s:e], v[:, :, s:e], visible(cols, cols[s:e]))
        acc = part if acc is None else merge_partials(*acc, *part)
    assert torch.allclose(acc[0], ref, atol=2e-6)
    assert torch.allclose(acc[1], ref_lse, atol=2e-6)
    # the same partials stacked (the decode-time all-gather merge)
    parts = [partial_attention(q, k[:, :, s:e], v[:, :, s:e], visible(cols, cols[s:e])) for s, e in bounds]
    out, lse = merge_stacked(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    assert torch.allclose(out, ref, atol=2e-6) and torch.allclose(lse, ref_lse, atol=2e-6)


@pytest.mark.parametrize("hkv", [8, 2])
def test_fused_and_math_paths_agree(hkv):
    """Unmasked and causal blocks (the CPU flash kernel) equal the masked fp32 matmul-softmax."""
    q, k, v = _qkv(Hkv=hkv, T=21)
    everything = torch.ones(1, 1, 21, 21, dtype=torch.bool)
    for fused, math_path in [(partial_attention(q, k, v, None), partial_attention(q, k, v, everything)),
                             (partial_attention(q, k, v, None, causal=True),
                              partial_attention(q, k, v, everything.tril()))]:
        assert torch.allclose(fused[0], math_path[0], atol=2e-6) and torch.allclose(fused[1], math_path[1], atol=2e-6)
        assert fused[0].dtype == fused[1].dtype == torch.float32


def test_fully_masked_rows_are_zero_and_neutral():
    """A block a query cannot see gives out 0, lse -inf, and merging it changes nothing (no NaN)."""
    q, k, v = _qkv(T=6)
    cols = torch.arange(6)
    future = partial_attention(q[:, :, :3], k[:, :, 3:], v[:, :, 3:], visible(cols[:3], cols[3:]))
    assert torch.all(future[0] == 0) and torch.all(torch.isneginf(future[1]))
    past = partial_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], visible(cols[:3], cols[:3]))
    merged = merge_partials(*past, *future)
    assert torch.equal(merged[0], past[0]) and torch.equal(merged[1], past[1])
    both = merge_partials(*future, *future)
    assert not torch.isnan(both[0]).any() and torch.all(both[0] == 0)


def test_padding_and_packed_masks():
    """Left padding (pad[b] hidden, a padding query sees itself) and a packed mask, block by block."""
    q, k, v = _qkv(T=12)
    cols = torch.arange(12)
    pad = torch.tensor([0, 4])
    full = visible(cols, cols, pad)
    ref = sdpa(q, k, v, mask=full)
    acc = None
    for s, e in [(6, 12), (0, 6)]:
        part = partial_attention(q, k[:, :, s:e], v[:, :, s:e], visible(cols, cols[s:e], pad))
        acc = part if acc is None else merge_partials(*acc, *part)
    assert torch.allclose(acc[0], ref, atol=2e-6)
    packed = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.5
    packed |= torch.eye(12, dtype=torch.bool)
    m = visible(cols, cols[3:], full_mask=packed)
    assert torch.equal(m, (packed & torch.ones(12, 12, dtype=torch.bool).tril())[:, :, :, 3:])


@pytest.mark.parametrize("T,N", [(8, 2), (13, 2), (13, 3), (100, 3), (6, 3)])
def test_zigzag_layout_partitions_and_balances(T, N):
    lay = ZigZag(T, N)
    cols = [lay.columns(r) for r in range(N)]
    assert sorted(torch.cat(cols).tolist()) == list(range(T))
    assert max(len(c) for c in cols) - min(len(c) for c in cols) <= 2
    assert lay.columns(0)[-1].item() == T - 1  # the last column is rank 0's (last_only broadcasts from it)
    # causal work per rank (visible query-key pairs): balanced to within ~10%, where a contiguous
    # split gives the last rank 2N-1 times the first rank's work
    work = [sum(int(c) + 1 for c in cs) for cs in cols]
    assert max(work) / min(work) < 1.1


def test_bad_inputs_are_clear_errors():
    """Another cache type, a batch larger than the cache, and a cache overflow name what is wrong."""
    from fmstack.config import named_config
    from fmstack.errors import FmstackError, ParameterError
    from fmstack.generation.kv_cache import StaticKVCache
    from fmstack.models.build import build_model
    from fmstack.parallel.dist import DistInfo
    from fmstack.parallel.ring import ContextParallel, RingKVCache

    cfg = named_config("tiny-gqa")
    plan = ContextParallel(DistInfo(0, 2, 0, torch.device("cpu")), group="unused")
    model = plan.finish(build_model(cfg))
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(FmstackError, match="--parallel cp cannot run with a StaticKVCache"):
        model(tokens, cache=StaticKVCache(cfg, 2, 16))
    with pytest.raises(ParameterError, match="batch of 2 rows exceeds"):
        model(tokens, cache=model.make_cache(1, 16))
    cache = RingKVCache(cfg, 1, 16, world=2, rank=0)
    assert cache.capacity == 8 + 3
    cache._claim(torch.arange(8), 12)
    with pytest.raises(ParameterError, match="holds 16 tokens; 12 \\+ 5 do not fit"):
        cache._claim(torch.arange(3), 5)


# -- multi-process exactness -------------------------------------------------------------------
def _run(tiny_checkpoints, tmp_path, nproc: int) -> dict:
    out = tmp_path / f"cp{nproc}.json"
    res = torchrun([str(WORKER), "--mode", "cp", "--out", str(out), *(str(tiny_checkpoints[c]) for c in CASES)],
                   nproc=nproc)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def results(request, tiny_checkpoints, tmp_path_factory):
    return _run(tiny_checkpoints, tmp_path_factory.mktemp("cp"), request.param), request.param


@pytest.mark.parametrize("case", CASES)
def test_ring_matches_single_process(results, case):
    res, nproc = results
    assert len(res[case]) == nproc
    for r in res[case]:  # every rank returns the same full outputs
        assert r["world"] == nproc
        assert r["logits_scale"] > 0.5
        for shape, diff in r["logits_max_abs"].items():
            assert diff <= 1e-5, (shape, diff)
        assert max(r["step_max_abs"]) <= 1e-5, r["step_max_abs"]
        assert r["tokens_par"] == r["tokens_ref"]
        assert r["score_max_abs"] <= 1e-4 and r["score_greedy_equal"]


@pytest.mark.parametrize("case", CASES)
def test_kv_cache_is_sharded(results, case):
    """Each rank stores about 1/N of the columns, and its cache buffers are about 1/N of the full one."""
    res, nproc = results
    fills = [r["kv_fill"] for r in res[case]]
    assert sum(fills) == res[case][0]["kv_length"] == 41 + 12  # prefill + decode columns, each stored once
    assert max(fills) - min(fills) <= 3
    for r in res[case]:
        assert r["kv_bytes_par"] <= r["kv_bytes_ref"] / nproc + 4 * r["kv_bytes_ref"] / 64


def test_cli_generate_matches_single_process(tiny_tok_checkpoint):
    out = generate_cli("cp", tiny_tok_checkpoint, n=16)
    assert out["token_ids"] == reference_ids(tiny_tok_checkpoint, 16)


LONG_PROMPT = " ".join([PROMPT + " Paris, and the capital of Italy is Rome."] * 30)  # ~400 tokens


@pytest.mark.slow
def test_default_model_long_prompt_matches_single_process(smollm2_gguf):
    """The acceptance command on SmolLM2-135M with a ~400-token prompt (about 2 minutes on 2 cores)."""
    import subprocess
    import sys

    args = ["-m", "fmstack", "generate", "--parallel", "cp", "--max-new-tokens", "32", "--json", LONG_PROMPT]
    res = torchrun(args, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    ref = subprocess.run([sys.executable, "-m", "fmstack", "generate", "--max-new-tokens", "32", "--json",
                          LONG_PROMPT], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = json.loads(ref.stdout.strip().splitlines()[-1])
    got = json.loads(lines[0])
    assert len(got["prompt_token_ids"]) > 300
    assert got["token_ids"] == want["token_ids"]


def _cli_json(res) -> dict:
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, res.stdout
    return json.loads(lines[0])


def test_cli_perplexity_long_windows_match_single_process(tiny_tok_checkpoint, tmp_path):
    """`fmstack eval perplexity --parallel cp` over ~600 tokens in 200-token windows (ring prefill of
    right-padded batches) gives the single-process NLL."""
    from fmstack.eval.perplexity import perplexity
    from fmstack.loading import load_model

    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog number {i * 7 % 13}." for i in range(40))
    path = tmp_path / "text.txt"
    path.write_text(text)
    loaded = load_model(str(tiny_tok_checkpoint))
    want = perplexity(loaded.model, loaded.tokenizer, text, max_length=200, batch_size=8)
    assert want.n_tokens > 400 and want.n_windows >= 3
    got = _cli_json(torchrun(["-m", "fmstack", "eval", "perplexity", "--parallel", "cp", "--model",
                              str(tiny_tok_checkpoint), "--text", str(path), "--max-length", "200", "--json"]))
    assert got["tokens"] == want.n_tokens and got["windows"] == want.n_windows
    assert abs(got["nll"] - want.nll) <= 1e-5 * want.n_tokens


@pytest.mark.slow
def test_default_model_hellaswag_matches_single_process(smollm2_gguf, hellaswag_dev):
    """`fmstack eval hellaswag --parallel cp` on 12 dev rows: the same acc / acc_norm as one process."""
    args = ["eval", "hellaswag", "--data", str(hellaswag_dev), "--limit", "12", "--json"]
    got = _cli_json(torchrun(["-m", "fmstack", *args[:2], "--parallel", "cp", *args[2:]], timeout=600))
    from fmstack.eval import hellaswag
    from fmstack.loading import load_model

    loaded = load_model(str(smollm2_gguf))
    want = hellaswag.evaluate(loaded.model, loaded.tokenizer, hellaswag.load_docs(hellaswag_dev, 12)).metrics
    assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"])


@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-process gloo group (P2POp needs a default group; the ring's peers 0 and 2 are not in
    it, so a send or receive posted outside the faked batch fails)."""
    import torch.distributed as tdist

    from tests.helpers import free_port

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def test_ring_step_posts_send_and_recv_as_one_batch(monkeypatch, one_rank_group):
    """Each ring step posts its send (to rank+1) and receive (from rank-1) together through
    batch_isend_irecv — separate isend/irecv with the same peer can deadlock on NCCL — and never
    one by one. The transport is faked (one process); exactness over gloo is the torchrun tests'."""
    import torch.distributed as tdist

    from fmstack.parallel import ring

    batches = []

    def fake_batch(ops):
        batches.append([(op.op, op.peer) for op in ops])
        for op in ops:
            if op.op is tdist.irecv:
                op.tensor.zero_()
        return []

    monkeypatch.setattr(tdist, "batch_isend_irecv", fake_batch)
    N, rank = 3, 1
    layout = ZigZag(12, N)
    n = layout.shard_len(rank)
    q, k, v = _qkv(B=1, H=4, Hkv=2, T=n, D=8)
    attn = ring._RingAttention(layout, rank, None, "cpu", None, None, None)
    out = attn.attend(0, q, k, v, torch.zeros(1, n, dtype=torch.long))
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert batches == [[(tdist.isend, 2), (tdist.irecv, 0)]] * (N - 1)
