"""CLI behaviour that needs no real weights: errors are one line, exit code 2."""

import subprocess
import sys


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fmstack", *args], capture_output=True, text=True, timeout=timeout)


def test_missing_model_file_is_one_line_error(tmp_path):
    proc = run("generate", "--model", str(tmp_path / "nope.gguf"), "hi")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fmstack: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_sampling_parameter_names_it():
    proc = run("generate", "--model", "random:tiny-mha", "--top-p", "2", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "fmstack: error: --top-p 2.0 is invalid: must be in (0, 1] (1 disables nucleus sampling)"


def test_random_model_has_no_tokenizer():
    proc = run("generate", "--model", "random:tiny-mha", "hi")
    assert proc.returncode == 2 and "no tokenizer" in proc.stderr


def test_help_lists_generate():
    proc = run("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout
