"""Stage runner of benchmarks/gpu_suite.py: each stage is a child process with a time budget that must
write one result file; nothing it starts outlives it.

Why a separate piece: a lent GPU machine is gone after its lease, and a suite that overruns it, or
leaves a compile worker holding the GPU, loses everything. So every stage:
  - runs in its own process group (a new session), killed as a group (SIGKILL) at its timeout, when
    the suite is interrupted (SIGTERM, SIGINT, SIGHUP raise `Interrupted`) and at exit;
  - gets min(its budget, what is left of the suite's budget), and is skipped when less than
    `min_s` is left;
  - is a failure unless it exits 0 AND writes its result file (a JSON document, or pytest's
    junit XML): an entry point that silently does nothing cannot pass;
  - is followed by `on_stage(record)`, which the suite uses to rewrite its summary, so a run cut
    short still leaves every finished stage's results.
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class Interrupted(Exception):
    """The suite got SIGTERM/SIGINT/SIGHUP: the running stage's process group is killed."""


@dataclass
class Stage:
    name: str
    cmd: list[str]
    budget_s: float  # the stage's timeout
    result: Path  # the file the stage must write
    log: str = "suite.log"  # file under the output directory that gets the child's stdout and stderr
    env: dict[str, str] | None = None
    min_s: float = 5.0  # skipped when less than this is left of the suite's budget
    info: dict = field(default_factory=dict)  # the suite's own notes (model, label, ...)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads (it and every child it started), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _interrupt(signum, frame):
    raise Interrupted(f"signal {signum}")


class StageRunner:
    """Runs stages one at a time inside a total budget of `budget_s` seconds from construction."""

    def __init__(self, out: Path, budget_s: float, cwd: Path, on_stage: Callable[[dict], None] | None = None,
                 say: Callable[[str], None] = print):
        self.out, self.cwd, self.on_stage, self.say = Path(out), Path(cwd), on_stage, say
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.records: list[dict] = []
        self.current: subprocess.Popen | None = None
        atexit.register(self.kill_current)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _interrupt)

    def kill_current(self) -> None:
        if self.current is not None and self.current.poll() is None:
            kill_group(self.current)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, stage: Stage) -> dict:
        """Run `stage` (or skip it when the budget is out); record status, seconds, rc; call on_stage."""
        rec = {"name": stage.name, "status": "skipped", "seconds": 0.0, "budget_s": stage.budget_s}
        left = self.remaining()
        if left < stage.min_s:
            rec["reason"] = f"budget: {max(left, 0):.0f}s left, stage needs >= {stage.min_s:.0f}s"
        else:
            timeout = min(stage.budget_s, left)
            self.say(f"stage {stage.name} (timeout {timeout:.0f}s)")
            stage.result.unlink(missing_ok=True)
            try:
                rec.update(self._execute(stage, timeout))
            except BaseException:
                rec.update(status="interrupted")
                self._finish(rec)
                raise
        self._finish(rec)
        return rec

    def _finish(self, rec: dict) -> None:
        note = rec.get("reason") or rec.get("error")
        self.say(f"stage {rec['name']}: {rec['status']}" + (f" ({note})" if note and rec["status"] != "ok" else "")
                 + f" [{rec['seconds']}s]")
        self.records.append(rec)
        if self.on_stage is not None:
            self.on_stage(rec)

    def _execute(self, stage: Stage, timeout: float) -> dict:
        t0 = time.perf_counter()
        log_path = self.out / stage.log
        with open(log_path, "a") as log:
            log.write(f"\n===== {now_iso()} stage {stage.name} $ {' '.join(stage.cmd)}\n")
            log.flush()
            start = log.tell()
            self.current = subprocess.Popen(stage.cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            env=stage.env, start_new_session=True)
            timed_out = False
            try:
                rc = self.current.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                self.kill_current()  # the stage's leftover children too, whatever happened
            rc = self.current.returncode
            self.current = None
            if timed_out:
                log.write(f"\n===== killed after {timeout:.0f}s (stage budget)\n")
        output = log_path.read_bytes()[start:].decode(errors="replace")
        rec = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(stage.cmd),
               "result_file": stage.result.is_file()}
        if timed_out:
            rec.update(status="timeout", error=f"killed after {timeout:.0f}s: {last_line(output)}")
        elif rc != 0:
            rec.update(status="failed", error=f"rc {rc}: {last_line(output)}")
        elif not stage.result.is_file():
            rec.update(status="failed", error=f"exited 0 without writing {stage.result.name}: {last_line(output)}")
        else:
            rec["status"] = "ok"
        if rec["status"] != "ok":
            rec["output_tail"] = output[-1500:]
        return rec


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("=====")]
    return lines[-1][:300] if lines else "(no output)"
