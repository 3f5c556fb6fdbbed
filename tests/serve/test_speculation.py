"""Prompt-lookup speculation in the engine (tiny random model, in process): greedy outputs equal the
non-speculative engine's over a mixed batch, rejected proposals leave no trace in the KV cache or the
block accounting, the acceptance rule is exact in distribution, and the load threshold turns it off."""

from __future__ import annotations

import pytest
import torch

from fmstack.errors import ParameterError
from fmstack.generation.sampling import SamplingParams
from fmstack.generation.speculative import accept_proposals
from fmstack.loading import load_model
from fmstack.serve import speculation
from fmstack.serve.engine import Engine, EngineConfig, RequestParams
from fmstack.serve.speculation import SpeculationConfig, ngram_lookup, parse_speculative, verify_drafts


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-gqa").model


def repetitive_prompts():
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 512, (6,), generator=g).tolist()
    return [base * 4, base * 2 + [7, 8, 9], torch.randint(0, 512, (20,), generator=g).tolist(), base * 6,
            torch.randint(0, 512, (45,), generator=g).tolist()]  # 45 tokens: a chunked prefill beside decodes


def engine(model, spec, **kw):
    cfg = dict(block_size=4, num_blocks=160, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128)
    return Engine(model, None, EngineConfig(**{**cfg, **kw}, speculative=spec))


def run(eng, prompts, params, check=None):
    outs = {}
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params[i] if isinstance(params, list) else params,
                        lambda o: outs.setdefault(o.request_id, []).append(o))
    while eng.has_work():
        eng.step()
        if check is not None:
            check(eng)
    return {k: [t for o in v for t in o.token_ids] for k, v in outs.items()}, outs


def test_ngram_lookup_and_parse():
    assert ngram_lookup([1, 2, 3, 9, 8, 1, 2, 3], 2) == [9, 8]  # the longest suffix that occurs earlier
    assert ngram_lookup([5, 1, 7, 4, 2, 3, 1], 3) == [7, 4, 2]  # falls back to a 1-token suffix
    assert ngram_lookup([1, 2, 3, 4], 3) == [] and ngram_lookup([1], 3) == []
    assert ngram_lookup([4, 4, 4, 4], 3) == [4]  # the latest occurrence: its continuation is short
    assert parse_speculative("ngram:6").k == 6 and parse_speculative("ngram").k == speculation.DEFAULT_K
    assert parse_speculative(None) is None and parse_speculative("off") is None
    for bad in ("ngram:x", "draft", "ngram:0", "ngram:99"):
        with pytest.raises(ParameterError, match="speculative"):
            parse_speculative(bad)


def test_greedy_outputs_equal_without_speculation(tiny):
    prompts = repetitive_prompts()
    params = [RequestParams(SamplingParams(max_new_tokens=20)) for _ in prompts]
    ref, _ = run(engine(tiny, None), prompts, params)
    # a stop token inside a run of accepted proposals ends the request there, as without speculation
    stop = ref["0"][15]
    params[0] = RequestParams(SamplingParams(max_new_tokens=20), stop_token_ids=(stop,))
    ref_stop, _ = run(engine(tiny, None), prompts[:1], params[:1])
    eng = engine(tiny, SpeculationConfig(k=4, max_batch=8))
    got, outs = run(eng, prompts, params)
    assert got["0"] == ref_stop["0"] and got["0"][-1] == stop and outs["0"][-1].completion_tokens == len(got["0"])
    assert {k: v for k, v in got.items() if k != "0"} == {k: v for k, v in ref.items() if k != "0"}
    s = eng.speculator
    assert 0 < s.accepted < s.proposed  # proposals were both kept and rejected
    assert eng.allocator.num_used == 0


def test_rejected_proposals_leave_no_trace(tiny, monkeypatch):
    """Every proposal is a random token (nearly all rejected), k spans several 2-token blocks: the
    outputs still equal the plain engine's, and after every step no sequence holds a block past
    its tokens (the rejected proposals' blocks went back)."""
    prompts = repetitive_prompts()
    params = RequestParams(SamplingParams(max_new_tokens=16))
    ref, _ = run(engine(tiny, None, block_size=2, num_blocks=300), prompts, params)
    g = torch.Generator().manual_seed(3)
    monkeypatch.setattr(speculation, "ngram_lookup", lambda tokens, k, *a: torch.randint(0, 512, (k,), generator=g).tolist())

    def check(eng):
        for seq in eng.scheduler.running:
            assert -(-seq.num_computed // 2) <= len(seq.blocks) <= -(-seq.num_tokens // 2)

    eng = engine(tiny, SpeculationConfig(k=6, max_batch=8), block_size=2, num_blocks=300)
    got, _ = run(eng, prompts, params, check)
    assert got == ref
    assert eng.speculator.proposed > 50 and eng.speculator.accepted < eng.speculator.proposed // 4
    assert eng.allocator.num_used == 0


def test_threshold_turns_speculation_off(tiny):
    seen = []

    def check(eng):
        seen.append(len(eng.scheduler.running))

    prompts = repetitive_prompts()[:4]
    eng = engine(tiny, SpeculationConfig(k=4, max_batch=2))
    drafted_at = []
    schedule = eng.scheduler.schedule

    def schedule_and_note():
        n_running = len(eng.scheduler.running)
        out = schedule()
        if any(c.draft for c in out.chunks):
            drafted_at.append(n_running)
        return out

    eng.scheduler.schedule = schedule_and_note
    run(eng, prompts, [RequestParams(SamplingParams(max_new_tokens=n)) for n in (30, 6, 6, 30)], check)
    assert max(seen) == 4 and eng.speculator.steps_off > 0  # the batch went above the threshold ...
    assert drafted_at and max(drafted_at) <= 2  # ... and nothing was proposed there


def test_acceptance_rule_is_exact_in_distribution():
    """One proposal d (a prompt-lookup draft is certain: q one-hot): the first committed token is
    distributed as the target's p, whether d is likely, unlikely or impossible under p."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]])
    gen = torch.Generator().manual_seed(0)

    def pick(q):
        return int(torch.multinomial(q, 1, generator=gen))

    n = 3000
    for d in (0, 2, 3):
        counts = torch.zeros(4)
        for _ in range(n):
            counts[accept_proposals([d], p, None, gen, pick)[0]] += 1
        assert torch.allclose(counts / n, p[0], atol=0.03), (d, counts / n)


def test_verify_drafts_gives_the_rule_the_target_distribution(monkeypatch):
    """Sampled rows: the acceptance rule gets the request's sampling distribution (temperature, top-k)
    at every position and a `pick` that draws from what it is given; greedy rows: the argmax path."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0], [0.5, 0.0, -0.5, 1.0, -3.0]])
    seen = {}

    def rule(draft, p, q, gen, pick):
        seen.update(draft=draft, p=p, q=q, picks={pick(torch.eye(5)[t]) for t in range(5)})
        return accept_proposals(draft, p, q, gen, pick)

    monkeypatch.setattr(speculation, "accept_proposals", rule)
    toks = verify_drafts(logits, [1], SamplingParams(temperature=0.5, top_k=4), torch.Generator().manual_seed(1))
    target = torch.zeros(2, 5)
    target[:, :4] = torch.softmax(logits[:, :4] / 0.5, -1)
    assert torch.allclose(seen["p"], target) and seen["q"] is None and seen["draft"] == [1]
    assert seen["picks"] == set(range(5)) and 1 <= len(toks) <= 2 and all(0 <= t < 4 for t in toks)
    greedy = SamplingParams()
    assert verify_drafts(logits, [0], greedy, None) == [0, 3]  # kept, then the bonus token (argmax of row 1)
    assert verify_drafts(logits, [3], greedy, None) == [0]  # rejected: replaced by the argmax


def test_sampled_and_ineligible_requests_run_with_speculation(tiny):
    prompts = repetitive_prompts()[:3]
    params = [RequestParams(SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95)),
              RequestParams(SamplingParams(max_new_tokens=12, temperature=0.9, seed=5)),  # seeded: not speculated
              RequestParams(SamplingParams(max_new_tokens=12), logprobs=2)]  # logprobs: not speculated
    ref, _ = run(engine(tiny, None), prompts[1:], params[1:])
    eng = engine(tiny, SpeculationConfig(k=4, max_batch=8))
    got, outs = run(eng, prompts, params)
    assert len(got["0"]) == 12 and all(0 <= t < 512 for t in got["0"])
    assert got["1"] == ref["0"] and got["2"] == ref["1"]  # the same as without speculation
    assert all(o.logprobs is not None and len(o.logprobs) == 1 for o in outs["2"])


def test_serve_command_options():
    from argparse import Namespace

    from fmstack.commands.serve import speculative_config

    assert speculative_config(Namespace(speculative="ngram:3", speculative_max_batch=2)) == SpeculationConfig(
        k=3, max_batch=2)
    assert speculative_config(Namespace(speculative=None, speculative_max_batch=None)) is None
    with pytest.raises(ParameterError, match="needs --speculative"):
        speculative_config(Namespace(speculative=None, speculative_max_batch=3))
    with pytest.raises(ParameterError, match="--speculative-max-batch 0"):
        speculative_config(Namespace(speculative="ngram", speculative_max_batch=0))
