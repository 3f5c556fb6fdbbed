"""benchmarks/gpu_suite.py on the CPU: the stage runner with fake stages (a timeout kills the child and
its children; a stage without its result file fails; the summary is rewritten after every stage), the
plan (order, budgets <= 8 minutes, every command the real entry point with flags `fmstack bench`
accepts), and the whole --dry-run (marked slow: about 1.5 minutes on 2 cores; `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_suite
from benchmarks.stages import Stage, StageRunner

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper that is not ours counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def py(code: str, *argv) -> list[str]:
    return [sys.executable, "-c", code, *map(str, argv)]


SLEEPER = ("import subprocess, sys, time\n"
           "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
           "open(sys.argv[1], 'w').write(str(p.pid))\n"
           "time.sleep(120)\n")


def wait_for(pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pred()


def test_timeout_kills_the_stage_and_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    runner = StageRunner(tmp_path, budget_s=60, cwd=tmp_path, say=lambda m: None)
    t0 = time.monotonic()
    rec = runner.run(Stage("sleepy", py(SLEEPER, pid_file), budget_s=3, result=tmp_path / "never.json"))
    assert rec["status"] == "timeout" and time.monotonic() - t0 < 30
    assert "killed after 3s" in rec["error"]
    assert wait_for(lambda: not alive(int(pid_file.read_text())), 10), "the stage's child outlived its timeout"
    assert runner.current is None


def test_sigterm_to_the_suite_kills_the_running_stage_and_its_children(tmp_path):
    """The suite process gets SIGTERM mid-stage: the stage's process group dies, the stage is recorded
    as interrupted, and the suite process ends."""
    suite_code = ("import sys\n"
                  f"sys.path.insert(0, {str(ROOT)!r})\n"
                  "from pathlib import Path\n"
                  "from benchmarks.stages import Interrupted, Stage, StageRunner\n"
                  "out = Path(sys.argv[1])\n"
                  "runner = StageRunner(out, 120, out, say=lambda m: None)\n"
                  "runner.install_signal_handlers()\n"
                  "try:\n"
                  f"    runner.run(Stage('s', [sys.executable, '-c', {SLEEPER!r}, str(out / 'gc.pid')], 100, out / 'r.json'))\n"
                  "except Interrupted:\n"
                  "    print('interrupted', runner.records[-1]['status'], flush=True)\n")
    proc = subprocess.Popen(py(suite_code, tmp_path), stdout=subprocess.PIPE, text=True)
    pid_file = tmp_path / "gc.pid"
    try:
        assert wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 60), "the stage did not start"
        proc.terminate()
        stdout, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert stdout.strip() == "interrupted interrupted"
    assert wait_for(lambda: not alive(int(pid_file.read_text())), 10), "the stage's child outlived the suite"


def test_stage_that_writes_no_result_fails_even_with_exit_0(tmp_path):
    runner = StageRunner(tmp_path, budget_s=60, cwd=tmp_path, say=lambda m: None)
    rec = runner.run(Stage("silent", py("print('did nothing')"), budget_s=30, result=tmp_path / "r.json"))
    assert rec["rc"] == 0 and rec["status"] == "failed"
    assert "without writing r.json" in rec["error"] and "did nothing" in rec["error"]
    ok = runner.run(Stage("writes", py("import sys; open(sys.argv[1], 'w').write('{}')", tmp_path / "w.json"),
                          budget_s=30, result=tmp_path / "w.json"))
    assert ok["status"] == "ok"
    failed = runner.run(Stage("exit1", py("import sys; open(sys.argv[1], 'w').write('{}'); sys.exit(1)",
                                          tmp_path / "f.json"), budget_s=30, result=tmp_path / "f.json"))
    assert failed["status"] == "failed" and failed["error"].startswith("rc 1")


def test_stage_is_skipped_when_the_budget_is_spent(tmp_path):
    runner = StageRunner(tmp_path, budget_s=0, cwd=tmp_path, say=lambda m: None)
    rec = runner.run(Stage("late", py("pass"), budget_s=30, result=tmp_path / "r.json", min_s=5))
    assert rec["status"] == "skipped" and "budget" in rec["reason"]


def test_summary_is_rewritten_after_every_stage(tmp_path, monkeypatch):
    """The second (fake) stage reads gpu_suite.json while it runs: the first stage is already in it.
    A stage whose result is not valid JSON fails; the suite goes on."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    copy_code = "import json, sys; json.dump({'gb_s': 100.0}, open(sys.argv[1], 'w'))"
    peek_code = ("import json, sys; s = json.load(open(sys.argv[1])); "
                 "json.dump({'shape': 'fake', 'variants': {}, 'seen': s['stages']}, open(sys.argv[2], 'w'))")

    def fake_plan(args, out_dir, tmp_dir):
        return [Stage("copy", py(copy_code, tmp / "copy.json"), 30, tmp / "copy.json", info={"kind": "copy"}),
                Stage("gemv", py(peek_code, out / "gpu_suite.json", tmp / "gemv.json"), 30, tmp / "gemv.json",
                      info={"kind": "gemv"}),
                Stage("env", py("import sys; open(sys.argv[1], 'w').write('not json')", tmp / "env.json"), 30,
                      tmp / "env.json", info={"kind": "env"})]

    monkeypatch.setattr(gpu_suite, "plan", fake_plan)
    args = gpu_suite.parse_args(["--out", str(out), "--dry-run"])
    suite = gpu_suite.Suite(args)
    suite.run()
    seen = suite.results["gemv"]["seen"]
    assert [(s["name"], s["status"]) for s in seen] == [("copy", "ok")]
    summary = json.loads((out / "gpu_suite.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("copy", "ok"), ("gemv", "ok"),
                                                                     ("env", "failed")]
    assert "unreadable" in summary["stages"][2]["error"]
    assert summary["copy_bandwidth"]["gb_s"] == 100.0
    assert (out / "gpu_suite.md").is_file()


def test_killed_pytest_still_names_the_tests_that_ran(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text("tests/gpu/test_cuda.py::test_a PASSED [ 10%]\ntests/gpu/test_cuda.py::test_b[x-1] FAILED [ 20%]\n"
                   "tests/gpu/test_cuda.py::test_c SKIPPED (needs a CUDA GPU) [ 30%]\n")
    res = gpu_suite.tests_result({"status": "timeout", "seconds": 3.0, "rc": -9}, tmp_path / "junit.xml", log)
    assert (res["passed"], res["failed"], res["skipped"]) == (1, 1, 1)
    assert [r["test"] for r in res["ran_before_kill"]] == ["tests/gpu/test_cuda.py::test_a",
                                                           "tests/gpu/test_cuda.py::test_b[x-1]",
                                                           "tests/gpu/test_cuda.py::test_c"]


def stage_kinds(stages) -> list[str]:
    return [s.name.split(":")[-1] if s.name.startswith("bench") else s.name for s in stages]


def test_gpu_plan_order_budgets_and_commands(tmp_path):
    from fmstack.bench.run import check_args
    from fmstack.cli import build_parser

    args = gpu_suite.parse_args(["--out", str(tmp_path)])
    stages = gpu_suite.plan(args, tmp_path, tmp_path)
    assert stage_kinds(stages) == ["env", "copy", "gemv", "bf16-b1", "int4-b1", "tests", "int8-b1", "bf16-b8-64"]
    assert sum(s.budget_s for s in stages) <= 480 and args.budget_s <= 480
    parser = build_parser()
    for s in stages:
        if s.name.startswith("bench"):
            assert s.cmd[1:4] == ["-m", "fmstack", "bench"]
            bench_args = parser.parse_args(s.cmd[3:])  # flags `fmstack bench` has
            check_args(bench_args)
            assert bench_args.device == "cuda" and bench_args.compile and bench_args.out == str(s.result)
    tests = next(s for s in stages if s.name == "tests")
    assert "-v" in tests.cmd and f"--junitxml={tests.result}" in tests.cmd and "tests/gpu" in tests.cmd


def test_plans_over_8_minutes_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--out", str(tmp_path), "--models", "llama2-7b,llama3-8b"])
    assert "budgets add up to" in capsys.readouterr().err
    args = gpu_suite.parse_args(["--out", str(tmp_path), "--models", "llama2-7b,llama3-8b", "--budget-s", "900"])
    assert stage_kinds(gpu_suite.plan(args, tmp_path, tmp_path)).count("bf16-b1") == 2


def test_dry_run_plan_is_the_same_stages_on_the_cpu(tmp_path):
    from fmstack.bench.run import check_args
    from fmstack.cli import build_parser

    args = gpu_suite.parse_args(["--out", str(tmp_path), "--dry-run"])
    stages = gpu_suite.plan(args, tmp_path, tmp_path)
    real = gpu_suite.plan(gpu_suite.parse_args(["--out", str(tmp_path)]), tmp_path, tmp_path)
    assert [s.name.split(":")[0] for s in stages] == [s.name.split(":")[0] for s in real]
    for s in stages:
        if s.name in ("env", "copy", "gemv"):
            assert s.cmd[-1] == "--dry-run" and s.cmd[-2] == str(s.result)
        elif s.name.startswith("bench"):
            a = build_parser().parse_args(s.cmd[3:])
            check_args(a)
            assert (a.model, a.device, a.compile, a.out) == ("random:tiny-gqa", "cpu", False, str(s.result))


@pytest.mark.slow  # CI time (20 min on 2 cores): run with -m slow
def test_dry_run_end_to_end(tmp_path):
    """Every stage on the CPU, each writing its JSON: in CI, so the suite's plumbing cannot silently break
    before a GPU is lent (about 3 minutes on 2 shared cores, ~200 s measured under load)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    summary = json.loads((out / "gpu_suite.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"] if s["status"] != "ok"] == [], proc.stdout[-3000:]
    assert proc.returncode == 0
    assert {r["stage"] for r in (row for rec in summary["bench"].values() for row in rec["rows"])} == {
        "bf16-b1", "int4-b1", "int8-b1", "bf16-b2"}
    assert summary["copy_bandwidth"]["gb_s"] > 0 and summary["gemv"]["variants"]
    assert summary["tests"]["skipped"] > 0  # the cuda tests collect and skip on the CPU
    for name in ("gpu_suite.md", "suite.log", "pytest.log", "junit.xml", "bench.log"):
        assert (out / name).is_file(), name
