"""Cold compile of the default model's generation graphs in one process: load, then the first
generate (prefill + decode graphs compiled), with torch's own per-phase times, every C++ compiler run
(Inductor's vector-ISA probe, the kernels' translation units, the precompiled header), and the CPU
seconds of this process and of the compiler processes it started. Writes its figures with the date,
the command and the load average to `benchmarks/results/cold_compile_cpu.json` (one entry per
`--label`, replaced when measured again).

Run it with an empty compile cache. What a machine keeps across `fmstack cache clear` may stay: the
native kernels (`kernels/`, built once per install) and, where this branch recorded it, Inductor's
ISA-probe outcomes (`isa/`, `fmstack.backends.vec_isa`); copy `isa/` too for a "this machine has
compiled before" figure, leave it out for the first compile ever:

    rm -rf /tmp/cold && mkdir -p /tmp/cold/kernels && cp -r ~/.cache/fmstack/kernels/* /tmp/cold/kernels/
    FMSTACK_CACHE_DIR=/tmp/cold python benchmarks/cold_compile.py --label first [QUANTIZE]  # default: auto
"""

import argparse
import datetime
import json
import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path

t0 = time.perf_counter()

import torch  # noqa: E402
from torch._dynamo.utils import compile_times  # noqa: E402
from torch._inductor import cpp_builder  # noqa: E402

from fmstack.generation.generate import Generator  # noqa: E402
from fmstack.generation.sampling import SamplingParams  # noqa: E402
from fmstack.loading import load_model  # noqa: E402
from fmstack.paths import cache_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cold_compile_cpu.json"
_runs: list[tuple[str, float]] = []
_runs_lock = threading.Lock()


def _record_compiler_runs() -> None:
    """Time every compiler command Inductor runs (in this process and its compile threads)."""
    run = cpp_builder._run_compile_cmd

    def timed(cmd_line: str, cwd: str) -> None:
        start = time.perf_counter()
        try:
            run(cmd_line, cwd)
        finally:
            with _runs_lock:
                _runs.append((cmd_line, time.perf_counter() - start))

    cpp_builder._run_compile_cmd = timed


def _kind(cmd_line: str) -> str:
    source = cmd_line.split()[1] if len(cmd_line.split()) > 1 else ""
    if source.endswith(".main.cpp"):
        return "kernel translation units"
    if source.endswith(".hpp") or " -E " in cmd_line:
        return "precompiled header"
    return "ISA probe and other test builds" if source.endswith(".cpp") else "other"


def compiler_summary() -> dict:
    out: dict[str, dict] = {}
    for cmd_line, seconds in _runs:
        entry = out.setdefault(_kind(cmd_line), {"runs": 0, "s": 0.0})
        entry["runs"] += 1
        entry["s"] = round(entry["s"] + seconds, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("quantize", nargs="?", default="auto")
    parser.add_argument("--label", default="after", help="the entry of the result file this run replaces")
    parser.add_argument("--out", type=Path, default=RESULTS, help="result file (- for none)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's own; 1 where another job holds a core: with 2 threads "
                             "every OpenMP region then waits for the descheduled one, seconds per token)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    logging.getLogger("fmstack").setLevel(logging.INFO)
    _record_compiler_runs()
    load_before, record_before = os.getloadavg(), sorted(p.name for p in (cache_dir() / "isa").glob("*.json"))
    lm = load_model("smollm2-135m-instruct", quantize=args.quantize)
    t1 = time.perf_counter()
    gen = Generator(lm.model, lm.tokenizer, compile=True)
    gen.generate([list(range(1, 40))], SamplingParams(temperature=0, max_new_tokens=4))
    t2 = time.perf_counter()
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    names, values = compile_times(repr="csv", aggregate=True)
    phases = {}
    for name, value in zip(names, values):
        try:
            if float(value) > 0.5:
                phases[name] = float(value)
        except ValueError:
            pass
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([f"{k}={os.environ[k]}" for k in ("PYTHONPATH", "FMSTACK_CACHE_DIR") if os.environ.get(k)]
                            + ["python"] + sys.argv),
        "model": f"smollm2-135m-instruct (quantize={args.quantize}), batch 1, greedy, prompt of 39 tokens, 4 new tokens",
        "threads": torch.get_num_threads(),
        "load_avg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "isa_record_at_start": record_before,
        "load_s": round(t1 - t0, 1),
        "prefill_plus_decode_compile_s": round(t2 - t1, 1),
        "cpu_s_self": round(me.ru_utime + me.ru_stime, 1),
        "cpu_s_compiler_children": round(children.ru_utime + children.ru_stime, 1),
        "compiler_runs": compiler_summary(),
        "compile_times_s": phases,
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    if str(args.out) != "-":
        data = json.loads(args.out.read_text()) if args.out.exists() else {}
        runs = data.get("runs", {}) if isinstance(data.get("runs"), dict) else {}
        runs[args.label] = result
        args.out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
