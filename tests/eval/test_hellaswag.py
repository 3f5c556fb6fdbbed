"""HellaSwag scoring vs HF transformers (fp32, same GGUF) scored the plain way, one full sequence at a
time; preprocessing and tokenization-split rules on hand-made rows; CLI output and errors.

Tolerances: log-likelihoods within 1e-3 absolute (sums of ~10 fp32 token log-probs, different
attention kernels); predictions equal on 10 rows, >= 99.5% equal on 200 (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fmstack.errors import FmstackError
from fmstack.eval import hellaswag as hs
from fmstack.eval.scoring import Scorer, encode_pair


def dev_docs(path, n: int) -> list[dict]:
    return hs.load_docs(path, n)


def hf_reference(hf, docs):
    """Per row: 4 log-likelihoods, each from its own full-sequence forward with HF's tokenizer."""
    model, tok = hf
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731  (SmolLM2 adds no BOS)
    out, reqs = [], []
    with torch.no_grad():
        for d in docs:
            ex = hs.to_example(d)
            row = []
            for choice in ex.choices:
                n_ctx = len(enc(ex.context))
                whole = enc(ex.context + " " + choice)
                reqs.append((whole[:n_ctx], whole[n_ctx:]))
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
                row.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
            out.append(row)
    return out, reqs


def compare(ours, hf, path, n):
    docs = dev_docs(path, n)
    ref, ref_reqs = hf_reference(hf, docs)
    result = hs.evaluate(ours.model, ours.tokenizer, docs, batch_size=8)
    assert hs.build_requests(ours.tokenizer, [hs.to_example(d) for d in docs]) == ref_reqs
    diff = max(abs(a - b) for r, row in zip(result.rows, ref) for a, b in zip(r.loglik, row))
    chars = [[len(c) for c in hs.to_example(d).choices] for d in docs]
    pred = [hs._argmax(row) for row in ref]
    pred_norm = [hs._argmax([x / c for x, c in zip(row, ch)]) for row, ch in zip(ref, chars)]
    agree = sum(r.pred == p for r, p in zip(result.rows, pred)) / n
    agree_norm = sum(r.pred_norm == p for r, p in zip(result.rows, pred_norm)) / n
    return diff, agree, agree_norm


def test_first_10_rows_match_hf(ours, hf, hellaswag_dev):
    diff, agree, agree_norm = compare(ours, hf, hellaswag_dev, 10)
    assert diff < 1e-3
    assert agree == agree_norm == 1.0


@pytest.mark.slow
def test_first_200_rows_match_hf(ours, hf, hellaswag_dev):
    diff, agree, agree_norm = compare(ours, hf, hellaswag_dev, 200)
    assert diff < 1e-3
    assert agree >= 0.995 and agree_norm >= 0.995


def test_packed_scoring_equals_plain_forward(ours):
    """Shared contexts, different lengths, a single-continuation group, a truncated context."""
    tok, model = ours.tokenizer, ours.model
    ctx = tok.encode("The cat sat on the mat and")
    reqs = [(ctx, tok.encode(" purred.")), (ctx, tok.encode(" looked out of the window at the birds.")),
            (ctx, tok.encode(" slept")), (tok.encode("Hello"), tok.encode(" world, how are you?")),
            (ctx, [])]
    scores = Scorer(model, batch_size=2).score(reqs)
    assert scores[-1].logprob == 0.0 and scores[-1].n_tokens == 0
    with torch.no_grad():
        for (c, k), s in zip(reqs[:-1], scores):
            logp = model(torch.tensor([c + k]))[0].float().log_softmax(-1)
            rows = torch.arange(len(c) - 1, len(c) + len(k) - 1)
            assert abs(logp[rows, torch.tensor(k)].sum().item() - s.logprob) < 1e-3
            assert s.greedy == bool((logp[rows].argmax(-1) == torch.tensor(k)).all())
            assert s.n_tokens == len(k)
    cut = Scorer(model, max_length=8).score([(ctx, reqs[0][1])])[0]  # context cut to 8 + 1 - len(cont)
    keep = ctx[len(ctx) + len(reqs[0][1]) - 9:]
    assert abs(cut.logprob - Scorer(model).score([(keep, reqs[0][1])])[0].logprob) < 1e-4


def test_several_groups_share_a_row(ours):
    """Short groups fill the room a long group's row leaves; each still sees only its own context."""
    tok, model = ours.tokenizer, ours.model
    long_ctx = tok.encode("A long story about a lighthouse keeper who climbed the stairs every single evening")
    reqs = [(long_ctx, tok.encode(" to light the lamp for the ships at sea.")), (long_ctx, tok.encode(" and sang."))]
    for i, text in enumerate(["Hi", "The dog", "Rain fell"]):
        ctx = tok.encode(text)
        reqs += [(ctx, tok.encode(" over the hills")), (ctx, tok.encode(f" {i} times"))]
    scorer = Scorer(model, batch_size=2)  # two rows: the long group's, and one holding the 3 short groups
    scores = scorer.score(reqs)
    assert scorer.stats.forwards == 1 and scorer.stats.padded_tokens == 2 * (len(long_ctx) + 10 + 1)
    with torch.no_grad():
        for (c, k), s in zip(reqs, scores):
            logp = model(torch.tensor([c + k]))[0].float().log_softmax(-1)
            rows = torch.arange(len(c) - 1, len(c) + len(k) - 1)
            assert abs(logp[rows, torch.tensor(k)].sum().item() - s.logprob) < 1e-3
            assert s.greedy == bool((logp[rows].argmax(-1) == torch.tensor(k)).all())


def test_packed_mask_groups():
    """Two groups in one row (context 0, continuations 1, 2; padding -1): nothing crosses a group."""
    from fmstack.eval.scoring import packed_mask

    seg = torch.tensor([[0, 0, 1, 2, 0, 1, -1]])
    grp = torch.tensor([[0, 0, 0, 0, 1, 1, -1]])
    m = packed_mask(seg, grp)[0, 0]
    assert m[3].tolist() == [True, True, False, True, False, False, False]  # own context and itself
    assert m[5].tolist() == [False] * 4 + [True, True, False]  # the second group sees only itself
    assert m[6].tolist() == [False] * 6 + [True]  # padding: itself only, never an empty row


# -- preprocessing and request building on hand-made rows -------------------------------------------
def row(**kw):
    base = dict(ind=1, activity_label="Act", ctx_a="Ctx a.", ctx_b="", label=0, endings=["x", "y", "z", "w"])
    return {**base, **kw}


def test_preprocess_rules():
    assert hs.preprocess("  Clean it [title] Dry it.  ") == "Clean it. Dry it."
    assert hs.preprocess("[header] How to cook [title] Boil water. [step] Add salt.") == \
        " How to cook. Boil water. Add salt."  # markup removal after the strip can leave a leading space
    # markup removal leaves double spaces, collapsed in one pass (a triple space keeps two)
    assert hs.preprocess("a [step]  b") == "a  b"
    assert hs.preprocess("a [step] b") == "a b"
    # the strip runs first, so a leading "[substeps] " leaves a leading space
    assert hs.preprocess("[substeps] Use a towel.") == " Use a towel."
    assert hs.preprocess("Non-greedy [a] keeps [b] text") == "Non-greedy keeps text"


def test_example_context_and_choices():
    ex = hs.to_example(row(activity_label="Home and Garden", ctx_a="[header] How to wash a dog [title] Fill the tub.",
                           ctx_b="", endings=["[substeps] Use warm water.", "Dry it [title] Done.", "a", "b"]))
    assert ex.context == "Home and Garden: How to wash a dog. Fill the tub."
    assert ex.choices == [" Use warm water.", "Dry it. Done.", "a", "b"]
    ex = hs.to_example(row(activity_label="Bowling", ctx_a="A man bowls.", ctx_b="the ball rolls"))
    assert ex.context == "Bowling: A man bowls. The ball rolls"  # ctx_b.capitalize()
    # WikiHow rows have ctx_b == "": the context ends with the joining space, then strip removes it
    assert hs.to_example(row(ctx_a="Step one.", ctx_b="")).context == "Act: Step one."


def test_substeps_ending_gives_double_space_continuation(ours):
    """A `[substeps]` ending keeps its leading space: the continuation is '  Use...' (two spaces)."""
    tok = ours.tokenizer
    ex = hs.to_example(row(endings=["[substeps] Use warm water.", "Use warm water.", "c", "d"]))
    (c1, k1), (c2, k2) = hs.build_requests(tok, [ex])[:2]
    assert c1 == c2 == tok.encode(ex.context)
    assert tok.decode(k1) == "  Use warm water." and tok.decode(k2) == " Use warm water."


def test_trailing_space_context_moves_to_continuation(ours):
    tok = ours.tokenizer
    ctx, cont = encode_pair(tok, "The answer is ", "42")
    assert (ctx, cont) == encode_pair(tok, "The answer is", " 42")
    assert tok.decode(ctx) == "The answer is" and tok.decode(cont) == " 42"
    whole = tok.encode("The answer is 42")
    assert ctx + cont == whole


def test_acc_norm_counts_characters_not_bytes():
    """Unicode endings: acc_norm divides by code points. Here bytes would pick ending 0, characters 1."""
    ex = hs.Example(1, 1, "ctx", ["ééééé", "abcdef"])  # 5 chars / 10 bytes, 6 chars / 6 bytes
    from fmstack.eval.scoring import Score

    (r,) = hs.score_examples([ex], [Score(-6.0, False, 3), Score(-6.6, False, 3)])
    assert r.cont_chars == [5, 6]
    assert r.pred == 0  # -6.0 > -6.6
    assert r.pred_norm == 1  # -6.6 / 6 = -1.1 > -6.0 / 5 = -1.2 (bytes: -0.6 > -1.1 would pick 0)


def test_unicode_ending_tokenizes_jointly(ours):
    tok = ours.tokenizer
    ex = hs.to_example(row(ctx_a="Café time.", endings=["Crème brûlée — délicieux…", "b", "c", "d"]))
    ctx, cont = hs.build_requests(tok, [ex])[0]
    assert tok.decode(ctx + cont) == "Act: Café time. Crème brûlée — délicieux…"
    assert hs.to_example(row(endings=["naïve ☕", "b", "c", "d"])).choices[0] == "naïve ☕"


def test_metrics_and_stderr():
    res = hs.HellaswagResult([hs.RowResult(i, 0, [0.0] * 4, [1] * 4, [1] * 4, p, 0) for i, p in
                              enumerate([0, 0, 1, 1])], seconds=1.0, forward_tokens=10)
    m = res.metrics
    assert m["acc"] == 0.5 and m["acc_norm"] == 1.0
    assert m["acc_stderr"] == pytest.approx((1 / 3) ** 0.5 / 2)  # sample std sqrt(1/3), / sqrt(4)
    assert m["acc_norm_stderr"] == 0.0
    assert hs.mean_stderr([1.0]) is None


# -- input validation --------------------------------------------------------------------------------
def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FmstackError, match="no such file"):
        hs.load_docs(tmp_path / "nope.jsonl")
    good = json.dumps(row())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(FmstackError, match=r"bad\.jsonl:3: not valid JSON"):
        hs.load_docs(bad)
    assert len(hs.load_docs(bad, limit=2)) == 2  # lines past --limit are not read
    for doc, msg in [({k: v for k, v in row().items() if k != "endings"}, "missing field 'endings'"),
                     (row(label=7), "'label' 7 is not an index"), (row(endings="abc"), "'endings' has type str"),
                     ([1, 2], "expected a JSON object")]:
        bad.write_text(good + "\n" + json.dumps(doc) + "\n")
        with pytest.raises(FmstackError, match=rf"bad\.jsonl:2: .*{msg}"):
            hs.load_docs(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(FmstackError, match="no rows"):
        hs.load_docs(tmp_path / "empty.jsonl")


def run_cli(capsys, *args):
    """`fmstack eval hellaswag ARGS` in-process -> (exit code, stdout, stderr)."""
    from fmstack.cli import main

    capsys.readouterr()
    rc = main(["eval", "hellaswag", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args,msg", [
    (["--data", "/nonexistent/h.jsonl"], "--data /nonexistent/h.jsonl: no such file"),
    (["--data", "/nonexistent/h.jsonl", "--limit", "0"], "--limit 0 is invalid"),  # checked before the file
    (["--data", "/nonexistent/h.jsonl", "--batch-size", "0"], "--batch-size 0 is invalid"),
])
def test_cli_errors(capsys, args, msg):
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith(f"fmstack: error: {msg}")


def test_cli_malformed_line(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row()) + "\n[oops\n")
    rc, _, err = run_cli(capsys, "--data", str(bad))
    assert rc == 2 and f"{bad}:2: not valid JSON" in err


def test_cli_json_and_predictions(capsys, tmp_path, ours, smollm2_gguf, hellaswag_dev):
    docs = dev_docs(hellaswag_dev, 3)
    preds = tmp_path / "preds.jsonl"
    rc, stdout, err = run_cli(capsys, "--model", str(smollm2_gguf), "--data", str(hellaswag_dev), "--limit", "3",
                              "--json", "--output", str(preds))
    assert rc == 0, err
    out = json.loads(stdout.strip().splitlines()[-1])
    for key in ("n", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "rows_per_s", "tokens_per_s"):
        assert key in out
    assert out["n"] == 3
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [x["ind"] for x in lines] == [d["ind"] for d in docs]
    assert set(lines[0]) == {"ind", "label", "loglik", "cont_chars", "cont_tokens", "pred", "pred_norm"}
    expected = hs.evaluate(ours.model, ours.tokenizer, docs)
    assert [x["pred"] for x in lines] == [r.pred for r in expected.rows]
    assert out["acc"] == pytest.approx(expected.metrics["acc"])
    assert "acc=" in stdout and "rows/s" in stdout


def test_python_m_fmstack_entry_point():
    """The installed command path, once, as a subprocess (argument errors exit before any model load)."""
    proc = subprocess.run([sys.executable, "-m", "fmstack", "eval", "hellaswag", "--data", "/nonexistent.jsonl"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "fmstack: error: --data /nonexistent.jsonl: no such file" in proc.stderr
