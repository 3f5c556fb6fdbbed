"""GPU validation and performance suite: one command on a lent CUDA machine, results under DIR.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_suite.py --out $OUT    # ~8 min on one H200
    python benchmarks/gpu_suite.py --out /tmp/dry --dry-run           # every stage on the CPU

Stages, in this order (cheap, high-value first), each a child process with its own time budget
(budgets in seconds; they add up to 460 <= 480, 8 minutes, compiles included):
  env      15  versions (gguf: `python -m fmstack` needs it), device properties, nvidia-smi
  copy     20  device copy bandwidth: 4 GiB `copy_`, (read + written) / time, median of 20: the 100% line
  gemv     45  one llama2-7b w_gate_up matmul per kernel (bf16 cuBLAS, int8, int8 as an Inductor
               reduction, int4 tinygemm) in CUDA graphs: GB/s per kernel
  bench    75  `python -m fmstack bench` bf16, batch 1: tok/s, GB/s, utilization, compiles
  bench    75  the same, int4
  tests   110  python -m pytest -m cuda tests/gpu (and other files with cuda-marked tests), -v, junit XML
  bench    60  int8, batch 1
  bench    60  bf16 batch sweep (--batch-sizes, default 8,64), one process
  hf      120  (--with hf) bf16 batch 1 again with --peers hf (HF eager, HF static cache + compile)
  prefill  60  (--with prefill) a 2048-token prompt at batch 1
A stage fails unless it exits 0 and writes its result file (JSON; junit XML for the tests); a stage
that runs out of its budget is killed with its whole process group; the summary (gpu_suite.json,
gpu_suite.md) is rewritten after every stage and on SIGTERM/SIGINT/SIGHUP. See benchmarks/stages.py.

--dry-run: every stage on the CPU on random:tiny-gqa (small shapes, 8-token prompts, 4 new tokens,
one repeat, bench with --no-compile: compiling on the CPU takes minutes), writing its JSON; what
tests/benchmarks/test_gpu_suite.py checks.

Files in DIR (flat, at most 8, as the device tool brings back): gpu_suite.json (everything),
gpu_suite.md (tables for the README), suite.log (progress, the probes' output), pytest.log
(-v: names every test as it runs), junit.xml, bench.log.
Targets: bf16 batch-1 decode >= 85% of copy bandwidth, int8/int4 >= 70%, zero recompiles.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.stages import Interrupted, Stage, StageRunner, now_iso  # noqa: E402

RANDOM_NOTE = ("random weights generated on the GPU (random:<config>): shapes and bytes of the real models, "
               "so speed is representative; token quality is not measured")
TARGETS = {"bf16": 0.85, "int8": 0.70, "int4": 0.70}  # batch-1 decode, fraction of copy bandwidth
PROMPT_LEN, NEW_TOKENS = 128, 128  # 256 tokens: exactly one cache length (no re-allocation)
SUITE_BUDGET_S = 480.0  # 8 minutes on one H200, compiles included
# seconds per stage on an H200 (budgets: the stage is killed past them)
BUDGETS = {"env": 15, "copy": 20, "gemv": 45, "bf16-b1": 75, "int4-b1": 75, "tests": 110, "int8-b1": 60,
           "sweep": 60, "hf": 120, "prefill": 60}
DRY_RUN_BUDGET_S = 300.0  # per stage on a CPU (int4 builds its CPU kernel even without --compile)
OPTIONAL = ("hf", "prefill")
PYTEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- the plan ---------------------------------------------------------------------------------------

def bench_cmd(args: argparse.Namespace, model: str, extra: list[str], out: Path, prompt_len: int = PROMPT_LEN,
              new_tokens: int = NEW_TOKENS) -> list[str]:
    """`python -m fmstack bench` (the real entry point) for one stage; in a dry run, small on the CPU."""
    cmd = [sys.executable, "-m", "fmstack", "bench", "--model", f"random:{model}", "--dtype", "bf16",
           "--repeats", str(args.repeats), "--out", str(out)]
    if args.dry_run:
        return cmd + ["--device", "cpu", "--prompt-len", "8", "--new-tokens", "4", "--warmup-tokens", "2",
                      "--threads", "1", "--no-compile", *extra]
    return cmd + ["--device", "cuda", "--compile", "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens),
                  *extra]  # --compile spelled out: $FMSTACK_COMPILE=0 must not turn the GPU figures eager


def tests_cmd(args: argparse.Namespace, junit: Path) -> list[str]:
    """pytest -m cuda over tests/gpu and every other test file with cuda-marked tests: -v names each
    test in pytest.log as it runs (a killed run still says which ran); junit XML at the end."""
    paths = ["tests/gpu"] + [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("test_*.py"))
                             if p.relative_to(ROOT / "tests").parts[0] != "gpu"
                             and "mark.cuda" in p.read_text(errors="replace")]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *paths, "-v", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    if not args.dry_run and importlib_has("pytest_timeout"):
        cmd.append("--timeout=60")
    return cmd


def importlib_has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan(args: argparse.Namespace, out: Path, tmp: Path) -> list[Stage]:
    """The stages in run order (see the module docstring), with their budgets and result files."""
    dry = ["--dry-run"] if args.dry_run else []
    probes = str(ROOT / "benchmarks" / "gpu_probes.py")
    stages = [Stage(kind, [sys.executable, probes, kind, str(tmp / f"{kind}.json"), *dry], BUDGETS[kind],
                    tmp / f"{kind}.json", env=child_env(), info={"kind": kind})
              for kind in ("env", "copy", "gemv")]
    for i, model in enumerate(args.model_list):
        def bench(label: str, extra: list[str], budget: str, **kw) -> Stage:
            path = tmp / f"bench_{model}_{label}.json"
            kind = budget if budget in OPTIONAL else "bench"
            return Stage(f"{kind}:{model}:{label}", bench_cmd(args, model, extra, path, **kw), BUDGETS[budget],
                         path, log="bench.log", env=child_env(TORCH_LOGS="recompiles"), min_s=20,
                         info={"kind": kind, "model": model, "label": label})

        sweep = ",".join(str(b) for b in args.sweep)
        stages += [bench("bf16-b1", ["--quantize", "none", "--batch-sizes", "1"], "bf16-b1"),
                   bench("int4-b1", ["--quantize", "int4", "--batch-sizes", "1"], "int4-b1")]
        if i == 0:
            stages.append(Stage("tests", tests_cmd(args, out / "junit.xml"), BUDGETS["tests"], out / "junit.xml",
                                log="pytest.log", env=child_env(), min_s=30, info={"kind": "tests"}))
        stages.append(bench("int8-b1", ["--quantize", "int8", "--batch-sizes", "1"], "int8-b1"))
        if sweep:
            stages.append(bench(f"bf16-b{sweep.replace(',', '-')}", ["--quantize", "none", "--batch-sizes", sweep],
                                "sweep"))
        if "hf" in args.with_kinds:
            stages.append(bench("hf", ["--quantize", "none", "--batch-sizes", "1", "--peers", "hf"], "hf",
                                new_tokens=64))
        if "prefill" in args.with_kinds:
            stages.append(bench("prefill-2048", ["--quantize", "none", "--batch-sizes", "1", "--warmup-tokens", "2"],
                                "prefill", prompt_len=2048, new_tokens=2))
    if args.dry_run:
        for s in stages:
            s.budget_s = DRY_RUN_BUDGET_S
    return [s for s in stages if s.info["kind"] not in args.skip_kinds]


# -- the suite --------------------------------------------------------------------------------------

class Suite:
    """The stages' runner plus the summary: each finished stage's result file is folded into
    `results` and gpu_suite.json / gpu_suite.md are rewritten."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.log_path = self.out / "suite.log"
        self.log_path.write_text("")
        for name in ("pytest.log", "bench.log", "junit.xml"):
            (self.out / name).unlink(missing_ok=True)
        self.stages = plan(args, self.out, self.tmp)
        self.runner = StageRunner(self.out, args.budget_s, ROOT, on_stage=self.absorb, say=self.say)
        self.by_name = {s.name: s for s in self.stages}
        self.results: dict = {
            "suite": {"started": now_iso(), "dry_run": args.dry_run, "budget_s": args.budget_s,
                      "stage_budgets_s": {s.name: s.budget_s for s in self.stages},
                      "command": " ".join([sys.executable] + sys.argv), "note": RANDOM_NOTE,
                      "prompt_len": 8 if args.dry_run else PROMPT_LEN, "new_tokens": 4 if args.dry_run else NEW_TOKENS,
                      "targets": {f"{k} batch-1 utilization": v for k, v in TARGETS.items()}
                      | {"recompiles during timed generations": 0}},
            "stages": self.runner.records, "env": {}, "copy_bandwidth": None, "tests": None, "bench": {},
            "gemv": None,
        }

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.runner.t0:6.0f}s] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def run(self) -> None:
        self.say(f"gpu suite{' (dry run, CPU)' if self.args.dry_run else ''}: models {','.join(self.args.model_list)}, "
                 f"{len(self.stages)} stages, budget {self.args.budget_s:.0f}s, out {self.out}")
        self.write()
        for stage in self.stages:
            self.runner.run(stage)

    def absorb(self, rec: dict) -> None:
        """Fold a finished stage's result file into the summary, then rewrite it."""
        stage = self.by_name[rec["name"]]
        kind = stage.info["kind"]
        try:
            if kind == "tests":
                self.results["tests"] = tests_result(rec, stage.result, self.out / "pytest.log")
            elif rec["status"] == "ok":
                data = json.loads(stage.result.read_text())
                if kind == "env":
                    self.results["env"] = data
                elif kind == "copy":
                    self.results["copy_bandwidth"] = data
                    self.say(f"copy bandwidth {data['gb_s']:.0f} GB/s")
                elif kind == "gemv":
                    self.results["gemv"] = data
                else:
                    self.results["bench"][f"{stage.info['model']}:{stage.info['label']}"] = bench_result(
                        rec, data, stage, self.copy_gb_s(), self.out / "bench.log")
        except Exception as e:  # noqa: BLE001 - an unreadable result fails its stage, the suite goes on
            rec.update(status="failed", error=f"result {stage.result.name} unreadable: {type(e).__name__}: {e}")
        self.write()

    def copy_gb_s(self) -> float | None:
        c = self.results.get("copy_bandwidth")
        return c["gb_s"] if c else None

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
        self.results["suite"]["elapsed_s"] = round(time.monotonic() - self.runner.t0, 1)
        try:
            self.evaluate()
            g = self.results.get("gemv")
            copy = self.copy_gb_s()
            for v in (g or {}).get("variants", {}).values():
                v["utilization"] = round(v["gb_s"] / copy, 3) if copy and v.get("gb_s") else None
        except Exception:  # noqa: BLE001 - a half-filled result must still be written
            with open(self.log_path, "a") as f:
                f.write(traceback.format_exc())
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        try:
            md = markdown(self.results)
        except Exception as e:  # noqa: BLE001 - the JSON above is the record; the tables are a view of it
            md = f"(tables not rendered: {type(e).__name__}: {e}; see gpu_suite.json)\n"
            with open(self.log_path, "a") as f:
                f.write(traceback.format_exc())
        (self.out / "gpu_suite.md").write_text(md)


def tests_result(rec: dict, junit: Path, log: Path) -> dict:
    """The tests stage's counts from its junit XML, or, when pytest was killed before writing it,
    from the -v lines of pytest.log (every test that ran, with its outcome)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    res = {"command": rec.get("command"), "rc": rec.get("rc"), "status": rec["status"],
           "seconds": rec["seconds"], "summary": (text.strip().splitlines() or [""])[-1][:300]}
    if junit.is_file():
        return res | parse_junit(junit)
    ran = [{"test": m.group(1), "outcome": m.group(2)} for m in map(PYTEST_LINE.match, text.splitlines()) if m]
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for r in ran:
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(r["outcome"], "skipped")
        counts[key] += 1
    return res | counts | {"ran_before_kill": ran, "failures": [{"test": r["test"], "message": r["outcome"]}
                                                                for r in ran if r["outcome"] in ("FAILED", "ERROR")]}


def bench_result(rec: dict, report: dict, stage: Stage, copy_gb_s: float | None, log: Path) -> dict:
    """A bench stage's report with its flat rows and the TORCH_LOGS=recompiles lines of its output."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    mine = text[text.rfind(f"stage {stage.name} $"):]
    return {"command": rec["command"], "rc": rec["rc"], "seconds": rec["seconds"], "report": report,
            "rows": summarize_bench(report, stage.info["model"], stage.info["label"], copy_gb_s),
            "recompile_log_lines": len(re.findall(r"Recompiling function", mine)),
            "recompile_limit_hits": len(re.findall(r"recompile_limit|cache_size_limit", mine))}


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
    if res["suite"].get("dry_run"):
        lines += ["**Dry run on the CPU** (random:tiny-gqa, small shapes, no compile): checks the plumbing; "
                  "no figure or target below means anything.", ""]
    lines.append(f"Models: {RANDOM_NOTE}. bf16 activations; prompt {res['suite']['prompt_len']} tokens, "
                 f"{res['suite']['new_tokens']} new tokens per row, greedy, compiled (CUDA graphs for decode).")
    if copy:
        lines.append(f"Copy bandwidth (the 100% line): **{copy['gb_s']:.0f} GB/s** ({copy.get('method')}).")
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



# -- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__.splitlines()[0],
                                epilog="Stages, budgets and outputs: see the module docstring and docs/gpu.md.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for the results (created; default $OUT)")
    p.add_argument("--dry-run", action="store_true",
                   help="every stage on the CPU with random:tiny-gqa, small shapes (checks the plumbing)")
    p.add_argument("--quick", action="store_true", help="kept for old commands: the default plan is the quick one")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"total budget; the planned stages' budgets must fit in it (default {SUITE_BUDGET_S:.0f}, "
                        f"8 minutes; dry run: stages x {DRY_RUN_BUDGET_S:.0f})")
    p.add_argument("--models", default="llama2-7b", help="comma list of configs (default llama2-7b)")
    p.add_argument("--batch-sizes", default="8,64", help="bf16 sweep batch sizes besides 1 (default 8,64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per bench row (default 3)")
    p.add_argument("--with", dest="with_", default="", help="optional stages: hf, prefill (comma list)")
    p.add_argument("--skip", default="", help="comma list of stage kinds to skip: env, copy, gemv, bench, tests, "
                                              "hf, prefill")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out DIR is required (or set $OUT)")
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.dry_run:
        args.model_list, args.repeats = ["tiny-gqa"], 1
    try:
        sweep = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r}: expected a comma list of integers")
    if any(b < 1 for b in sweep):
        p.error(f"--batch-sizes {args.batch_sizes!r}: batch sizes must be >= 1")
    args.sweep = [b for b in dict.fromkeys(sweep) if b != 1] if not args.dry_run else [2]
    args.with_kinds = {s.strip() for s in args.with_.split(",") if s.strip()}
    args.skip_kinds = {s.strip() for s in args.skip.split(",") if s.strip()}
    kinds = {"env", "copy", "gemv", "bench", "tests", *OPTIONAL}
    for opt, given, allowed in (("--with", args.with_kinds, set(OPTIONAL)), ("--skip", args.skip_kinds, kinds)):
        if given - allowed:
            p.error(f"{opt}: unknown stage kind(s) {sorted(given - allowed)}; allowed: {', '.join(sorted(allowed))}")
    check_budget(p, args)
    return args


def check_budget(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The planned stages' budgets must add up to at most --budget-s (default 8 minutes)."""
    stages = plan(args, Path(args.out), Path(tempfile.gettempdir()))
    total = sum(s.budget_s for s in stages)
    if args.budget_s is None:
        args.budget_s = total if args.dry_run else SUITE_BUDGET_S
    if total > args.budget_s:
        p.error(f"the planned stages' budgets add up to {total:.0f}s, over --budget-s {args.budget_s:.0f}s: "
                f"{', '.join(f'{s.name} {s.budget_s:.0f}' for s in stages)}; run fewer models/stages "
                "(--models, --batch-sizes, --with, --skip) or raise --budget-s on a longer lease")


def check_cuda() -> str | None:
    """None when a CUDA device is usable, else the reason."""
    try:
        import torch
    except ImportError as e:
        return f"PyTorch is not importable ({e})"
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else
                                                 ", a CPU-only build")
        return f"CUDA is not available on this machine ({build}); this suite needs an NVIDIA GPU (or --dry-run)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = None if args.dry_run else check_cuda()
    if reason:
        print(f"gpu_suite: error: {reason}", file=sys.stderr)
        return 2
    if not args.dry_run:
        from fmstack.config import named_config

        for m in args.model_list:
            named_config(m)  # unknown names fail here, before any stage
    suite = Suite(args)
    suite.runner.install_signal_handlers()
    try:
        suite.run()
    except (Interrupted, KeyboardInterrupt) as e:
        suite.say(f"interrupted ({e}): writing what there is")
    finally:
        suite.runner.kill_current()
        suite.write()
    print()
    print((suite.out / "gpu_suite.md").read_text())
    failed = [s["name"] for s in suite.results["stages"] if s["status"] not in ("ok", "skipped")]
    suite.say(f"done in {time.monotonic() - suite.runner.t0:.0f}s; results in {suite.out}"
              + (f"; stages not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
