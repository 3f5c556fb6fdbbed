"""Sliding-window perplexity vs a direct HF transformers computation (the "perplexity of fixed-length
models" recipe: labels -100 outside each window's new tokens, HF's own shifted loss), plus the window
arithmetic and the CLI. Tolerance: summed NLL within 1e-3 relative."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fmstack.errors import FmstackError, ParameterError
from fmstack.eval.perplexity import perplexity, read_text, windows

TEXT = ("The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the sea, the "
        "fishermen prepared their nets before dawn, talking quietly about the weather and the price of "
        "bread. Nobody expected the storm that arrived that afternoon, nor the strange ship it left behind.")


def hf_nll(hf, text: str, max_length: int, stride: int) -> tuple[float, int]:
    """Summed NLL and scored-token count, computed the way HF's perplexity guide does."""
    model, tok = hf
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    n, nll, count, prev_end = ids.shape[1], 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            trg_len = end - prev_end
            inp = ids[:, begin:end]
            labels = inp.clone()
            labels[:, :-trg_len] = -100
            valid = int((labels[:, 1:] != -100).sum())
            nll += model(inp, labels=labels).loss.item() * valid
            count += valid
            prev_end = end
            if end == n:
                break
    return nll, count


@pytest.mark.parametrize("max_length,stride", [(24, 24), (24, 10)])
def test_matches_hf(ours, hf, max_length, stride):
    res = perplexity(ours.model, ours.tokenizer, TEXT, max_length=max_length, stride=stride, batch_size=3)
    nll, count = hf_nll(hf, TEXT, max_length, stride)
    assert res.n_tokens == count
    assert res.nll == pytest.approx(nll, rel=1e-3)
    m = res.metrics
    assert m["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-3)
    assert 0 < m["bits_per_byte"] < 8 and m["word_perplexity"] > m["perplexity"]


def test_full_window_is_one_plain_forward(ours):
    ids = ours.tokenizer.encode(TEXT)
    res = perplexity(ours.model, ours.tokenizer, TEXT)  # max_length = model context: one window
    with torch.no_grad():
        logp = ours.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    direct = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    assert res.n_windows == 1 and res.n_tokens == len(ids) - 1
    assert res.nll == pytest.approx(direct, rel=1e-4)


def test_windows():
    assert windows(10, 4, 4) == [(0, 1, 4), (4, 5, 8), (8, 9, 10)]  # disjoint: each window's first token unscored
    assert windows(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert windows(3, 8, 8) == [(0, 1, 3)]
    for bad in (0, 5):
        with pytest.raises(ParameterError, match="stride"):
            windows(10, 4, bad)


def test_errors(ours, tmp_path):
    with pytest.raises(FmstackError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(ParameterError, match="max_length"):
        perplexity(ours.model, ours.tokenizer, TEXT, max_length=10**6)
    with pytest.raises(FmstackError, match="at least 2"):
        perplexity(ours.model, ours.tokenizer, "Hi")


def test_cli(capsys, tmp_path, smollm2_gguf, ours):
    from fmstack.cli import main

    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    cmd = ["eval", "perplexity", "--model", str(smollm2_gguf), "--text", str(path)]
    assert main(cmd + ["--max-length", "24", "--stride", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = perplexity(ours.model, ours.tokenizer, TEXT, max_length=24, stride=10).metrics
    assert out["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert out["tokens"] == expected["tokens"]
    assert main(cmd + ["--max-length", "24", "--stride", "30"]) == 2
    assert "stride=30 is invalid" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--text", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
