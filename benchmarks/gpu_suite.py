"""GPU validation and performance suite: one command on a lent CUDA machine, results under DIR.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_suite.py --out DIR --quick   # one model, ~8 min on an H200

Stages, in order; each is wrapped (a failure or timeout is recorded and the rest still runs), each
gets what is left of --budget-s (a stage that cannot fit is skipped and says so), and the results are
rewritten after every stage, so a run cut short still leaves them:
  env          device, driver, torch/CUDA/triton/transformers versions, date, nvidia-smi
  copy         device copy bandwidth: a 4 GiB `copy_`, bytes read + written / time, CUDA events,
               median of 20 (the ceiling decode utilization is measured against)
  tests        python -m pytest -m cuda tests/gpu (and any other test file with cuda-marked tests)
  bench        `python -m fmstack.bench` (what `fmstack bench` runs) on random:<config> models, random
               weights generated on the GPU, bf16 / int8 / int4 at batch 1 (tok/s, achieved GB/s,
               utilization), a bf16 batch sweep (ms per decode step), prefill tok/s, and what
               torch.compile compiled during the timed generations (must be nothing)
  gemv         one decode-shaped matmul per kernel (bf16 cuBLAS, int8 aten, int8 as an Inductor
               reduction, int4 tinygemm) in CUDA graphs: GB/s per kernel, to explain the bench numbers
  hf           the bf16 batch-1 bench again with --peers hf (HF eager and HF static cache + compile on
               an HF model of the same shape), when transformers imports
  prefill      (full mode) a 2048-token prompt at batch 1

Files in DIR (at most 8, flat, as the device tool brings back): gpu_suite.json (everything),
gpu_suite.md (tables for the README), suite.log, env.txt, pytest.log, bench.log.
Targets: bf16 batch-1 decode >= 85% of copy bandwidth, int8/int4 >= 70%, zero recompiles.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RANDOM_NOTE = ("random weights generated on the GPU (random:<config>): shapes and bytes of the real models, "
               "so speed is representative; token quality is not measured")
TARGETS = {"bf16": 0.85, "int8": 0.70, "int4": 0.70}  # batch-1 decode, fraction of copy bandwidth
PROMPT_LEN, NEW_TOKENS = 128, 128  # 256 tokens: exactly one cache length (no re-allocation)


class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


# -- small helpers ----------------------------------------------------------------------------------

def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_cmd(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> dict:
    """Run `cmd` in the repo root, stdout+stderr appended to log_path; its whole process group is
    killed on timeout (Inductor's compile workers too)."""
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {now_iso()} $ {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()  # bytes
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:
            _kill(proc)
            raise
        if timed_out:
            _kill(proc)
            rc = proc.returncode
            log.write(f"\n===== killed after {timeout:.0f}s (stage timeout)\n")
    text = log_path.read_bytes()[start:].decode(errors="replace")
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 1), "output": text}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def tail(text: str, n: int = 1500) -> str:
    return text[-n:]


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("=====")]
    return lines[-1][:300] if lines else "(no output)"


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- the suite --------------------------------------------------------------------------------------

class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.log_path = self.out / "suite.log"
        self.log_path.write_text("")
        self.results: dict = {
            "suite": {"started": now_iso(), "quick": args.quick, "budget_s": args.budget_s,
                      "command": " ".join([sys.executable] + sys.argv), "note": RANDOM_NOTE,
                      "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                      "targets": {f"{k} batch-1 utilization": v for k, v in TARGETS.items()}
                      | {"recompiles during timed generations": 0}},
            "stages": [], "env": {}, "copy_bandwidth": None, "tests": None, "bench": {}, "gemv": None,
        }

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def bench_min_s(self) -> float:
        """Time a bench stage needs to be worth starting: 60 s, or 80% of the last bench stage's time
        (each compiles its own graphs), so a stage that would be killed half-way is skipped instead."""
        done = [s["seconds"] for s in self.results["stages"]
                if s["name"].startswith(("bench:", "hf:")) and s["status"] == "ok"]
        return max(60.0, 0.8 * done[-1]) if done else 60.0

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.0f}s] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def stage(self, name: str, fn, cap_s: float, min_s: float = 30.0) -> None:
        """Run fn(timeout_s) unless the budget is out; record status, seconds and any error."""
        left = self.remaining() - 5.0
        rec = {"name": name, "status": "skipped", "seconds": 0.0}
        if name.split(":")[0] in self.args.skip_kinds:
            rec["reason"] = "--skip"
        elif left < min_s:
            rec["reason"] = f"budget: {max(left, 0):.0f}s left, stage needs >= {min_s:.0f}s"
        else:
            timeout = min(cap_s, left)
            self.say(f"stage {name} (timeout {timeout:.0f}s)")
            t0 = time.perf_counter()
            try:
                status = fn(timeout) or "ok"
                if isinstance(status, tuple):  # (status, reason)
                    status, rec["error"] = status
                rec["status"] = status
            except Interrupted:
                rec.update(status="interrupted")
                self.results["stages"].append(rec)
                raise
            except Exception as e:  # noqa: BLE001 - recorded, the next stage runs
                rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
                with open(self.log_path, "a") as f:
                    f.write(traceback.format_exc())
            rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.say(f"stage {name}: {rec['status']}" + (f" ({rec.get('reason') or rec.get('error')})"
                                                       if rec["status"] not in ("ok",) else "")
                 + f" [{rec['seconds']}s]")
        self.results["stages"].append(rec)
        self.write()

    # -- stages -------------------------------------------------------------------------------------
    def env_stage(self, timeout: float) -> str:
        import torch

        p = torch.cuda.get_device_properties(0)
        env = {
            "date": now_iso(), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "triton": version("triton"), "transformers": version("transformers"), "pytest": version("pytest"),
            "device_name": torch.cuda.get_device_name(0), "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
            "device_count": torch.cuda.device_count(), "cpu_count": os.cpu_count(),
        }
        try:
            env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                               text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["git_commit"] = None
        smi_path = self.out / "env.txt"
        smi_path.write_text(json.dumps(env, indent=1) + "\n")
        for cmd in (["nvidia-smi"], ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                     "clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu",
                                     "--format=csv"]):
            try:
                r = run_cmd(cmd, smi_path, min(timeout, 30))
                env.setdefault("nvidia_smi", []).append(r["output"].strip()[-3000:])
            except OSError as e:
                env.setdefault("nvidia_smi", []).append(f"{cmd[0]}: {e}")
        self.results["env"] = env
        return "ok"

    def copy_stage(self, timeout: float) -> str:
        import torch

        n = 2**32  # 4 GiB each way: far beyond L2
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()  # not zeros
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        ok = bool(torch.equal(src[:: 2**20], dst[:: 2**20]))
        del src, dst
        torch.cuda.empty_cache()
        gbs = [2 * n / t / 1e9 for t in times]
        self.results["copy_bandwidth"] = {
            "gb_s": round(statistics.median(gbs), 1), "min": round(min(gbs), 1), "max": round(max(gbs), 1),
            "bytes_each_way": n, "repeats": len(times), "copy_checked": ok,
            "method": "dst.copy_(src), 4 GiB uint8 random, (read + written bytes) / time, CUDA events, median"}
        self.say(f"copy bandwidth {self.copy_gb_s():.0f} GB/s")
        return "ok" if ok else ("failed", "the copy's destination differs from its source")

    def copy_gb_s(self) -> float | None:
        c = self.results.get("copy_bandwidth")
        return c["gb_s"] if c else None

    def tests_stage(self, timeout: float) -> str:
        paths = ["tests/gpu"] + [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("test_*.py"))
                                 if "gpu" not in p.relative_to(ROOT / "tests").parts[:1]
                                 and "mark.cuda" in p.read_text(errors="replace")]
        junit = self.tmp / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *paths, "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd.append("--timeout=150")
        r = run_cmd(cmd, self.out / "pytest.log", timeout, child_env())
        res = {"command": " ".join(cmd), "rc": r["rc"], "timed_out": r["timed_out"], "seconds": r["seconds"],
               "summary": (r["output"].strip().splitlines() or [""])[-1][:300]}
        if junit.is_file():
            res.update(parse_junit(junit))
        self.results["tests"] = res
        if r["timed_out"]:
            return "timeout", f"killed after {timeout:.0f}s: {res['summary']}"
        if r["rc"] == 0 and res.get("failed", 0) == 0 and res.get("errors", 0) == 0:
            return "ok"
        return "failed", f"pytest rc {r['rc']}: {res['summary']}"

    def bench_stage(self, model: str, label: str, extra: list[str], timeout: float, prompt_len: int = PROMPT_LEN,
                    new_tokens: int = NEW_TOKENS) -> str:
        out = self.tmp / f"bench_{model}_{label}.json"
        cmd = [sys.executable, "-m", "fmstack.bench", "--model", f"random:{model}", "--device", "cuda",
               "--dtype", "bf16", "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens),
               "--repeats", str(self.args.repeats), "--out", str(out), *extra]
        r = run_cmd(cmd, self.out / "bench.log", timeout, child_env(TORCH_LOGS="recompiles"))
        rec = {"command": " ".join(cmd), "rc": r["rc"], "timed_out": r["timed_out"], "seconds": r["seconds"],
               "recompile_log_lines": len(re.findall(r"Recompiling function", r["output"])),
               "recompile_limit_hits": len(re.findall(r"recompile_limit|cache_size_limit", r["output"]))}
        if out.is_file():
            rec["report"] = json.loads(out.read_text())
            rec["rows"] = summarize_bench(rec["report"], model, label, self.copy_gb_s())
        else:
            rec["error_tail"] = tail(r["output"])
        self.results["bench"][f"{model}:{label}"] = rec
        if r["timed_out"]:
            return "timeout", f"killed after {timeout:.0f}s (see bench.log)"
        if r["rc"] == 0 and "report" in rec:
            return "ok"
        return "failed", f"rc {r['rc']}: {last_line(r['output'])}"

    def gemv_stage(self, timeout: float) -> str:
        out = self.tmp / "gemv.json"
        r = run_cmd([sys.executable, str(Path(__file__).resolve()), "--probe-gemv", str(out)],
                    self.out / "bench.log", timeout, child_env())
        if not out.is_file():
            self.results["gemv"] = {"rc": r["rc"], "error_tail": tail(r["output"])}
            return ("timeout" if r["timed_out"] else "failed"), f"rc {r['rc']}: {last_line(r['output'])}"
        res = json.loads(out.read_text())
        copy = self.copy_gb_s()
        for v in res["variants"].values():
            v["utilization"] = round(v["gb_s"] / copy, 3) if copy and v.get("gb_s") else None
        self.results["gemv"] = res
        return "ok" if r["rc"] == 0 else ("failed", f"rc {r['rc']}: {last_line(r['output'])}")

    # -- outputs ------------------------------------------------------------------------------------
    def all_rows(self) -> list[dict]:
        return [row for rec in self.results["bench"].values() for row in rec.get("rows", [])]

    def evaluate(self) -> None:
        rows, targets = self.all_rows(), []
        for model in self.args.model_list:
            for mode, stage in (("bf16", "bf16-b1"), ("int8", "int8-b1"), ("int4", "int4-b1")):
                hit = [r for r in rows if r["model"] == model and r["stage"] == stage and r["batch"] == 1
                       and r["system"].startswith("fmstack")]
                util = hit[0]["utilization"] if hit else None
                targets.append({"target": f"{model} {mode} batch-1 decode >= {TARGETS[mode]:.0%} of copy bandwidth",
                                "value": util, "pass": None if util is None else util >= TARGETS[mode]})
        fm = [r for r in rows if r["system"].startswith("fmstack")]
        timed = sum(r["timed_graphs"] or 0 for r in fm) if fm else None
        breaks = sum(r["timed_graph_breaks"] or 0 for r in fm) if fm else None
        limit_hits = sum(rec.get("recompile_limit_hits", 0) for rec in self.results["bench"].values())
        targets.append({"target": "zero recompiles (graphs compiled) during timed fmstack generations",
                        "value": timed, "pass": None if timed is None else timed == 0 and breaks == 0})
        t = self.results.get("tests")
        if t is not None:
            targets.append({"target": "cuda-marked tests pass (none failed, some ran)", "value": t.get("summary"),
                            "pass": t["rc"] == 0 and not t.get("failed") and not t.get("errors")
                            and t.get("passed", 0) > 0})
        self.results["recompiles"] = {
            "timed_graphs": timed, "timed_graph_breaks": breaks,
            "warmup_graphs": sum(r["warmup_graphs"] or 0 for r in fm) if fm else None,
            "cudagraph_skips": sum(r["cudagraph_skips"] or 0 for r in fm) if fm else None,
            "recompile_log_lines": sum(rec.get("recompile_log_lines", 0) for rec in self.results["bench"].values()),
            "recompile_limit_hits": limit_hits,
            "note": "graphs compiled per bench row (torch._dynamo counters): warm-up compiles each batch size's "
                    "graphs; the timed generations must compile nothing. recompile_log_lines counts TORCH_LOGS="
                    "recompiles messages (warm-up recompiles for new batch sizes included); a recompile-limit "
                    "hit means dynamo fell back to eager.",
        }
        self.results["targets"] = targets

    def write(self) -> None:
        self.results["suite"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        try:
            self.evaluate()
        except Exception:  # noqa: BLE001 - a half-filled result must still be written
            with open(self.log_path, "a") as f:
                f.write(traceback.format_exc())
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        (self.out / "gpu_suite.md").write_text(markdown(self.results))


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            el = case.find("failure")
            failures.append({"test": name, "message": (el.get("message") or "")[:500]})
        elif "error" in kinds:
            counts["errors"] += 1
            el = case.find("error")
            failures.append({"test": name, "message": (el.get("message") or "")[:500]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            skips.append({"test": name, "reason": (case.find("skipped").get("message") or "")[:500]})
        else:
            counts["passed"] += 1
    return counts | {"failures": failures, "skips": skips}


def summarize_bench(report: dict, model: str, stage: str, copy_gb_s: float | None) -> list[dict]:
    """One flat row per (system, batch): the bench medians plus streamed bytes and utilization."""
    from fmstack.config import named_config
    from fmstack.generation.generate import CACHE_LEN_MULTIPLE

    cfg = named_config(model)
    meta = report["meta"]
    elem = 2  # bf16: the embedding (never quantized) and the KV cache
    rows = []
    for r in report["results"]:
        system = r["system"]
        weights = report["systems"][system]["weight_bytes"]
        streamed = weights - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim * elem)  # 1 embedding row read
        if system.startswith("fmstack"):  # the static cache is read whole every step (masked)
            seq = min(cfg.max_seq_len, -(-(meta["prompt_len"] + meta["new_tokens"]) // CACHE_LEN_MULTIPLE)
                      * CACHE_LEN_MULTIPLE)
            streamed += 2 * cfg.n_layers * r["batch_size"] * cfg.n_kv_heads * seq * cfg.head_dim * elem
        steps_s = 1e3 / r["ms_per_step"]["median"]
        gbs = streamed * steps_s / 1e9
        comp = r.get("compiles") or {}
        rows.append({
            "model": model, "stage": stage, "system": system, "label": report["systems"][system]["label"],
            "batch": r["batch_size"], "tok_s": round(r["decode_tok_s"]["median"], 1),
            "ms_per_step": round(r["ms_per_step"]["median"], 3),
            "prefill_tok_s": round(r["prefill_tok_s"]["median"], 0), "ttft_ms": round(1e3 * r["ttft_s"]["median"], 2),
            "weight_gb_s": round(r["weight_gb_s"]["median"], 1), "streamed_gb_s": round(gbs, 1),
            "utilization": round(gbs / copy_gb_s, 3) if copy_gb_s else None,
            "peak_gb": round(r["peak_mb"] / 1024, 2),
            "warmup_graphs": (comp.get("warmup") or {}).get("graphs"),
            "timed_graphs": (comp.get("timed") or {}).get("graphs"),
            "timed_graph_breaks": (comp.get("timed") or {}).get("graph_breaks"),
            "cudagraph_skips": sum((comp.get(k) or {}).get("cudagraph_skips", 0) for k in ("warmup", "timed")),
            "ratio_vs_hf_eager": r.get("ratio_vs_hf_eager"),
        })
    return rows


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def markdown(res: dict) -> str:
    env, copy = res.get("env") or {}, res.get("copy_bandwidth")
    lines = [f"### GPU results: {env.get('device_name', '?')}, torch {env.get('torch', '?')} "
             f"(CUDA {env.get('cuda', '?')}), {env.get('date', res['suite']['started'])[:10]}", ""]
    lines.append(f"Models: {RANDOM_NOTE}. bf16 activations; prompt {res['suite']['prompt_len']} tokens, "
                 f"{res['suite']['new_tokens']} new tokens per row, greedy, compiled (CUDA graphs for decode).")
    if copy:
        lines.append(f"Copy bandwidth (the 100% line): **{copy['gb_s']:.0f} GB/s** (4 GiB `copy_`, bytes read + "
                     f"written, median of {copy['repeats']}).")
    lines += ["", "| model | system | batch | tok/s | ms/step | prefill tok/s | GB/s streamed | % of copy BW | "
                  "peak GB | compiles warm-up / timed |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = sorted((r for rec in res["bench"].values() for r in rec.get("rows", [])),
                  key=lambda r: (r["model"], r["system"], r["batch"], r["stage"]))
    seen = set()
    for r in rows:
        key = (r["model"], r["system"], r["batch"])
        if key in seen:  # bf16 batch 1 also runs in the hf stage: keep the first (dedicated) one
            continue
        seen.add(key)
        util = f"{100 * r['utilization']:.0f}%" if r["utilization"] is not None else "-"
        lines.append(f"| {r['model']} | {r['system']} | {r['batch']} | {r['tok_s']:.1f} | {r['ms_per_step']:.2f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['streamed_gb_s']:.0f} | {util} | {r['peak_gb']:.1f} | "
                     f"{_fmt(r['warmup_graphs'])} / {_fmt(r['timed_graphs'])} |")
    lines += ["", "GB/s streamed = (weight bytes - the embedding table, of which one row is read + the static KV "
                  "cache, read whole each step; HF rows: weights only) x decode steps/s. prefill tok/s = "
                  "batch x prompt tokens / time to first token."]
    g = res.get("gemv")
    if g and g.get("variants"):
        lines += ["", f"Decode-shaped matmul per kernel ({g['shape']}, batch 1, CUDA graph replays, weights rotated "
                      "beyond L2):", "", "| kernel | us/call | GB/s | % of copy BW | rel err |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, v in g["variants"].items():
            if "error" in v:
                lines.append(f"| {name} | failed: {cell(v['error'][:120])} | | | |")
                continue
            util = f"{100 * v['utilization']:.0f}%" if v.get("utilization") is not None else "-"
            lines.append(f"| {name} | {v['us_per_call']:.1f} | {v['gb_s']:.0f} | {util} | {v['rel_err']:.1e} |")
    lines += ["", "| target | value | pass |", "| --- | --- | --- |"]
    for t in res.get("targets", []):
        v = t["value"]
        v = f"{100 * v:.0f}%" if isinstance(v, float) else _fmt(v)
        lines.append(f"| {t['target']} | {cell(v)} | {_fmt({True: 'yes', False: '**no**'}.get(t['pass']))} |")
    t = res.get("tests")
    if t:
        lines += ["", f"Tests (`pytest -m cuda`): {t.get('passed', '?')} passed, {t.get('failed', '?')} failed, "
                      f"{t.get('errors', '?')} errors, {t.get('skipped', '?')} skipped."]
        for f in t.get("failures", [])[:20]:
            lines.append(f"- FAILED {f['test']}: {cell(f['message'][:300])}")
        for s in t.get("skips", [])[:40]:
            lines.append(f"- skipped {s['test']}: {cell(s['reason'][:300])}")
    lines += ["", "| stage | status | seconds |", "| --- | --- | ---: |"]
    for s in res["stages"]:
        note = s.get("reason") or s.get("error") or ""
        lines.append(f"| {s['name']} | {s['status']}{': ' + cell(note[:160]) if note else ''} | {s['seconds']} |")
    return "\n".join(lines) + "\n"


# -- the int8/int4/bf16 decode matmul probe (a child process of the suite) ---------------------------

def probe_gemv(path: str) -> int:
    """Time one llama2-7b w_gate_up matmul ([1, 4096] x [22016, 4096]) per kernel inside a CUDA graph,
    rotating over enough weight copies that they do not fit in L2; check each against bf16."""
    import torch
    import torch.nn.functional as F

    from fmstack.quant import ops
    from fmstack.quant.linear import dequantize_int4, int4_params, quantize_int4_with, quantize_int8

    dev = torch.device("cuda")
    n, k, group = 22016, 4096, 32
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)

    def base() -> torch.Tensor:
        return torch.randn(n, k, device=dev, generator=g) * 0.02

    def copies(make, each_bytes: int) -> tuple[list, torch.Tensor]:
        """(weight copies: enough to total >= 1 GiB, far beyond L2; the first copy's bf16 dequantization)"""
        first, ref = make()
        return [first] + [make()[0] for _ in range(max(2, min(32, math.ceil(2**30 / each_bytes))) - 1)], ref

    def bf16_w():
        w = base().to(torch.bfloat16)
        return (w,), w

    def int8_w():
        q, s = quantize_int8(base())
        s = s.to(torch.bfloat16)
        return (q, s), q.to(torch.bfloat16) * s[:, None]

    def int4_w():
        w = base()
        scales, zeros = int4_params(w, group)
        q = quantize_int4_with(w, scales, zeros, group)
        packed, sz = ops.int4_prepare(q, scales, zeros, torch.bfloat16)
        deq = dequantize_int4(q, sz[..., 0].T.float(), sz[..., 1].T.float(), group).to(torch.bfloat16)
        return (packed, sz), deq

    def fused_int8(x, q, s):
        return F.linear(x, q.to(x.dtype)) * s

    from torch._inductor import config as inductor_config

    with inductor_config.patch(coordinate_descent_tuning=True):  # M=1 mm -> a fusable reduction
        fused = torch.compile(fused_int8, fullgraph=True)

    variants = {
        "bf16 F.linear (cuBLAS)": (bf16_w, n * k * 2, lambda w: F.linear(x, w)),
        "int8 aten._weight_int8pack_mm (fmstack)": (int8_w, n * k + n * 2, lambda q, s: ops.int8_mm(x, q, s)),
        "int8 Inductor reduction (coordinate_descent_tuning)": (int8_w, n * k + n * 2, lambda q, s: fused(x, q, s)),
        f"int4 g{group} aten._weight_int4pack_mm (fmstack)": (int4_w, n * k // 2 + (k // group) * n * 2 * 2,
                                                            lambda p, sz: ops.int4_mm(x, p, sz, group)),
    }
    out = {"shape": f"[1, {k}] x [{n}, {k}]^T", "variants": {}}
    for name, (make, nbytes, fn) in variants.items():
        try:
            ws, deq = copies(make, nbytes)
            with inductor_config.patch(coordinate_descent_tuning=True):
                for w in ws[:2]:
                    fn(*w)  # compile / warm up
            torch.cuda.synchronize()
            ref = F.linear(x.float(), deq.float())
            err = ((fn(*ws[0]).float() - ref).norm() / ref.norm()).item()
            del deq
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for w in ws:
                    fn(*w)
            graph.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3 / len(ws))
            t = statistics.median(times)
            out["variants"][name] = {"us_per_call": round(t * 1e6, 2), "gb_s": round(nbytes / t / 1e9, 1),
                                     "bytes": nbytes, "copies": len(ws), "rel_err": err}
            del ws, graph
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - one kernel failing is a result
            out["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(name, out["variants"][name], flush=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    return 0


# -- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__.splitlines()[0],
                                epilog="Stages and outputs: see the module docstring and docs/gpu.md.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for the results (created); on the device tool: $OUT")
    p.add_argument("--quick", action="store_true",
                   help="one model (llama2-7b), bf16 sweep at batch 8 and 64 only: fits one ~9-minute device call")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget; stages that cannot fit are skipped (default 450 with --quick, 540 "
                        "without: both fit one 10-minute device call; raise it on a longer lease)")
    p.add_argument("--models", default=None, help="comma list of configs (default: llama2-7b with --quick, "
                                                   "else llama2-7b,llama3-8b)")
    p.add_argument("--batch-sizes", default=None,
                   help="bf16 sweep batch sizes besides 1 (default 8,64 with --quick, else 2,4,8,16,32,64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per bench row (default 3)")
    p.add_argument("--skip", default="", help="comma list of stage kinds to skip: env, copy, tests, bench, gemv, "
                                              "hf, prefill")
    p.add_argument("--probe-gemv", default=None, help=argparse.SUPPRESS)  # internal: the gemv child process
    args = p.parse_args(argv)
    if args.probe_gemv is None and not args.out:
        p.error("--out DIR is required")
    args.budget_s = args.budget_s or (450.0 if args.quick else 540.0)
    args.model_list = [m.strip() for m in (args.models or ("llama2-7b" if args.quick else "llama2-7b,llama3-8b"))
                       .split(",") if m.strip()]
    try:
        args.sweep = [int(b) for b in (args.batch_sizes or ("8,64" if args.quick else "2,4,8,16,32,64")).split(",")
                      if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r}: expected a comma list of integers")
    if any(b < 1 for b in args.sweep):
        p.error("--batch-sizes must be positive")
    args.sweep = [b for b in dict.fromkeys(args.sweep) if b != 1]  # batch 1 has its own stages
    args.skip_kinds = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def check_cuda() -> str | None:
    """None when a CUDA device is usable, else the reason."""
    try:
        import torch
    except ImportError as e:
        return f"PyTorch is not importable ({e})"
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else
                                                 ", a CPU-only build")
        return f"CUDA is not available on this machine ({build}); this suite needs an NVIDIA GPU"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = check_cuda()
    if reason:
        print(f"gpu_suite: error: {reason}", file=sys.stderr)
        return 2
    if args.probe_gemv:
        return probe_gemv(args.probe_gemv)
    from fmstack.config import named_config

    for m in args.model_list:
        named_config(m)  # unknown names fail here, before any stage
    suite = Suite(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    suite.say(f"gpu suite: models {','.join(args.model_list)}, budget {args.budget_s:.0f}s, out {suite.out}")
    quick = args.quick
    try:
        suite.stage("env", suite.env_stage, cap_s=60, min_s=5)
        suite.stage("copy", suite.copy_stage, cap_s=60, min_s=5)
        suite.stage("tests", suite.tests_stage, cap_s=150 if quick else 240, min_s=60)
        have_hf = importlib.util.find_spec("transformers") is not None
        for i, model in enumerate(args.model_list):
            def bench(label: str, extra: list[str], model=model, **kw):
                return lambda timeout: suite.bench_stage(model, label, extra, timeout, **kw)

            # One process per row group: a stage killed at its timeout loses only its own rows.
            for mode in ("bf16", "int4", "int8"):
                q = "none" if mode == "bf16" else mode
                suite.stage(f"bench:{model}:{mode}-b1", bench(f"{mode}-b1", ["--quantize", q, "--batch-sizes", "1"]),
                            cap_s=200, min_s=suite.bench_min_s())
            if i == 0:
                suite.stage("gemv", suite.gemv_stage, cap_s=90, min_s=40)
            for b in args.sweep:
                suite.stage(f"bench:{model}:bf16-b{b}", bench(f"bf16-b{b}", ["--quantize", "none", "--batch-sizes",
                                                                            str(b)]),
                            cap_s=200, min_s=suite.bench_min_s())
            if have_hf:
                suite.stage(f"hf:{model}", bench("hf", ["--quantize", "none", "--batch-sizes", "1", "--peers", "hf"],
                                                 new_tokens=64), cap_s=240, min_s=max(90, suite.bench_min_s()))
            else:
                suite.results["stages"].append({"name": f"hf:{model}", "status": "skipped", "seconds": 0.0,
                                                "reason": "transformers is not importable: no HF peer"})
                suite.say(f"stage hf:{model}: skipped (transformers is not importable: no HF peer)")
            if not quick:
                suite.stage(f"prefill:{model}", bench("prefill-2048", ["--quantize", "none", "--batch-sizes", "1",
                                                                       "--warmup-tokens", "2"],
                                                      prompt_len=2048, new_tokens=2),
                            cap_s=200, min_s=suite.bench_min_s())
    except (Interrupted, KeyboardInterrupt) as e:
        suite.say(f"interrupted ({e}): writing what there is")
    finally:
        suite.write()
    print()
    print((suite.out / "gpu_suite.md").read_text())
    failed = [s["name"] for s in suite.results["stages"] if s["status"] not in ("ok", "skipped")]
    suite.say(f"done in {time.monotonic() - suite.t0:.0f}s; results in {suite.out}"
              + (f"; stages not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
