"""`fmstack serve` argument errors: one line on stderr, exit 2, before any model is loaded."""

from __future__ import annotations

import pytest

from fmstack.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["--port", "70000"], "--port 70000"),
    (["--max-num-seqs", "0"], "--max-num-seqs 0"),
    (["--max-model-len", "1"], "--max-model-len 1"),
    (["--host", "not a host"], "--host"),
    (["--parallel", "tp"], "--parallel"),
    (["--kv-cache-mb", "-5"], "--kv-cache-mb -5"),
])
def test_serve_rejects_bad_arguments(argv, needle, capsys):
    assert main(["serve", "--model", "random:tiny-gqa", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("fmstack: error:")


def test_serve_max_model_len_beyond_the_model(capsys):
    assert main(["serve", "--model", "random:tiny-gqa", "--max-model-len", "257"]) == 2
    assert "exceeds the model's context length 256" in capsys.readouterr().err
