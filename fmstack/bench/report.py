"""The benchmark's report: the JSON document `fmstack bench --out` writes and the text table it prints.
The JSON format is what benchmarks/gpu_suite.py and the README tables read: fields are only added."""

from __future__ import annotations

import datetime
import platform
import sys
import time
from dataclasses import dataclass

import torch

from fmstack.bench.measure import System, device_name, stats


@dataclass
class Plan:
    """The checked settings of one benchmark run (from the command line's arguments)."""
    batch_sizes: list[int]
    modes: list[str]  # fmstack weight modes: none, int8, int4
    peers: set[str]
    speculate_k: int | None  # None: no speculative decoding
    parallel: str = "none"


def build_report(args, plan: Plan, device, systems: list[System], load_avg: tuple, compiles: dict[str, int]) -> dict:
    """The JSON report: `meta` (machine, versions, settings, load average at start and end, compile
    counters), `systems` (label, weight bytes, load time) and `results` (one row per system and batch)."""
    rows = result_rows(systems, plan.batch_sizes, args.prompt_len)
    add_ratios(rows, systems)
    read_gb_s = read_bandwidth() if device.type == "cpu" else None
    if read_gb_s:
        add_outside_weights(rows, systems, read_gb_s)
    return {
        "meta": {**meta(args, plan, device, load_avg, compiles), "read_gb_s": read_gb_s},
        "systems": {s.name: {"label": s.label, "weight_bytes": s.weight_bytes, "load_s": round(s.load_s, 3),
                             **({"sdpa_backend_chosen": s.extra["sdpa_backend"]} if "sdpa_backend" in s.extra else {})}
                    for s in systems},
        "results": rows,
    }


def meta(args, plan: Plan, device, load_avg: tuple, compiles: dict[str, int]) -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    load_start, load_end = load_avg
    speculative = None
    if plan.speculate_k is not None:
        speculative = {"draft_model": args.draft_model, "draft_quantize": args.draft_quantize,
                       "speculate_k": plan.speculate_k}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "device": str(device), "device_name": device_name(device),
        "torch": torch.__version__, "transformers": tf_version, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_avg_start": list(load_start) if load_start else None,
        "load_avg_end": list(load_end) if load_end else None,
        "model": args.model, "dtype": args.dtype, "compile": args.compile,
        "decode_compiler": args.decode_compiler if args.compile else None,
        "sdpa_backend": args.sdpa_backend,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "batch_sizes": plan.batch_sizes, "prompt": args.prompt, "quantize": args.quantize,
        "group_size": args.group_size, "speculative": speculative,
        "memory": "process peak RSS (VmHWM)" if device.type == "cpu" else "torch.cuda.max_memory_allocated",
        "command": " ".join(sys.argv),
        # torch.compile over the whole run (loading, warm-ups, timed runs); per row: "compiles"
        "compile_counters": compiles,
    }


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """The machine's streaming read bandwidth now, GB/s: best of `repeats` sums of an int64 buffer of
    `nbytes` (larger than the caches) with the benchmark's threads. A decode step at batch 1 reads its
    weights once; this is the floor it is measured against."""
    buf = torch.ones(nbytes // 8, dtype=torch.int64)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return round(nbytes / best / 1e9, 2)


def add_outside_weights(rows: list[dict], systems: list[System], read_gb_s: float) -> None:
    """Per row: `weights_floor_ms`, the time to read the system's weight bytes once at `read_gb_s`, and
    `outside_weights_ms`, the median step time minus it: what a step costs beyond streaming its
    weights (norms, RoPE, attention, sampling, kernel launches, the Python wrapper)."""
    weight_bytes = {s.name: s.weight_bytes for s in systems}
    for r in rows:
        floor_ms = 1e3 * weight_bytes[r["system"]] / (read_gb_s * 1e9)
        r["weights_floor_ms"] = round(floor_ms, 3)
        r["outside_weights_ms"] = round(r["ms_per_step"]["median"] - floor_ms, 3)


def result_rows(systems: list[System], batch_sizes: list[int], prompt_len: int) -> list[dict]:
    """One row per system and batch size it ran: median/min/max of each figure over the timed runs."""
    rows = []
    for s in systems:
        for B in batch_sizes:
            if B not in s.runs:
                continue
            runs = s.runs[B]
            tok_s = [r.steps * r.batch / r.decode_s for r in runs]
            ms_step = [1e3 * r.decode_s / r.steps for r in runs]
            ttft = [r.ttft_s for r in runs]
            prefill = [r.batch * prompt_len / r.ttft_s for r in runs]
            gbs = [s.weight_bytes * (r.steps / r.decode_s) / 1e9 for r in runs]
            rows.append({
                "system": s.name, "batch_size": B,
                "decode_tok_s": stats(tok_s), "ms_per_step": stats(ms_step),
                "prefill_tok_s": stats(prefill), "ttft_s": stats(ttft), "weight_gb_s": stats(gbs),
                **{k: round(v, 1) for k, v in s.peak_mem[B].items()},
                # graphs compiled in the untimed warm-up (expected: this batch size's) and in the timed
                # runs (expected 0: anything there is a recompile inside a generation)
                "compiles": s.extra.get("compiles", {}).get(B),
            })
    return rows


def add_ratios(rows: list[dict], systems: list[System]) -> None:
    """Each row's median tok/s over HF eager's, plain fmstack's and llama.cpp's at the same batch size
    (None without that system), and the speculative rows' acceptance."""
    def medians(system: str) -> dict[int, float]:
        return {r["batch_size"]: r["decode_tok_s"]["median"] for r in rows if r["system"] == system}

    hf, plain, cpp = medians("hf-eager"), medians("fmstack"), medians("llama.cpp")
    for r in rows:
        for key, ref in (("ratio_vs_hf_eager", hf), ("ratio_vs_fmstack", plain), ("ratio_vs_llamacpp", cpp)):
            base = ref.get(r["batch_size"])
            r[key] = round(r["decode_tok_s"]["median"] / base, 3) if base else None
    for s in systems:
        counts = s.extra.get("counts")
        if counts and counts["proposed"]:
            for r in rows:
                if r["system"] == s.name:
                    r["acceptance_rate"] = round(counts["accepted"] / counts["proposed"], 4)
                    r["mean_accepted"] = round(counts["accepted"] / counts["rounds"], 4)


def format_table(report: dict) -> str:
    """The report as a text table: one line per system and batch size (what `fmstack bench` prints)."""
    m = report["meta"]
    load = m["load_avg_start"]
    lines = [f"# {m['model']} {m['dtype']} on {m['device_name']}, {m['threads']} threads, torch {m['torch']}, "
             f"prompt {m['prompt_len']}, {m['new_tokens']} new tokens, {m['repeats']} repeats"
             + (f", load avg {load[0]:.2f} -> {m['load_avg_end'][0]:.2f}" if load else "")]
    header = (f"{'system':<13} {'batch':>5} {'tok/s median [min-max]':>26} {'ms/step':>8} {'prefill tok/s':>13} "
              f"{'TTFT ms':>8} {'GB/s':>6} {'peak MB':>8} {'vs HF eager':>11} {'vs fmstack':>10} "
              f"{'vs llama.cpp':>12}")
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        t = r["decode_tok_s"]
        spread = f"{t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}]"
        ratios = [f"{r[k]:.2f}x" if r.get(k) else "-" for k in ("ratio_vs_hf_eager", "ratio_vs_fmstack",
                                                                 "ratio_vs_llamacpp")]
        lines.append(f"{r['system']:<13} {r['batch_size']:>5} {spread:>26} {r['ms_per_step']['median']:>8.2f} "
                     f"{r['prefill_tok_s']['median']:>13.1f} {1e3 * r['ttft_s']['median']:>8.1f} "
                     f"{r['weight_gb_s']['median']:>6.1f} {r['peak_mb']:>8.0f} {ratios[0]:>11} {ratios[1]:>10} "
                     f"{ratios[2]:>12}")
        if "acceptance_rate" in r:
            lines.append(f"{'':<13} {'':>5} speculative: acceptance {100 * r['acceptance_rate']:.1f}%, "
                         f"{r['mean_accepted']:.2f} draft tokens accepted per round")
    return "\n".join(lines)


# -- `fmstack bench --whole-command` -----------------------------------------------------------------
WHOLE_NAMES = {"fmstack": "fmstack", "hf": "hf-eager", "llamacpp": "llama.cpp"}
WHOLE_FIGURES = ("wall_s", "ttft_s", "load_s", "prefill_s", "decode_tok_s")


def build_whole_report(args, threads: int, prompt: str, runs: dict, load_avg: tuple) -> dict:
    """The whole-command report, in the usual layout: `meta` (with fmstack's command and the flags its
    runs reported, defaults included), `systems`, and one `results` row per system and phase (cold /
    warm for fmstack, "-" for the peers, which keep no cache): median/min/max of each figure."""
    fm = runs.get(("fmstack", "cold"), [{}])[0]
    rows = []
    for (system, phase), recs in runs.items():
        row = {"system": WHOLE_NAMES[system], "phase": phase, "batch_size": 1,
               **{k: stats([r[k] for r in recs]) for k in WHOLE_FIGURES if all(r.get(k) is not None for r in recs)},
               "tokens": [r["tokens"] for r in recs], "prompt_tokens": recs[0]["prompt_tokens"]}
        rows.append(row)
    hf = next((r for r in rows if r["system"] == "hf-eager"), None)
    for r in rows:  # > 1: faster than HF eager
        r["wall_speedup_vs_hf_eager"] = round(hf["wall_s"]["median"] / r["wall_s"]["median"], 3) if hf else None
        both = hf and "decode_tok_s" in r and "decode_tok_s" in hf
        r["decode_ratio_vs_hf_eager"] = (round(r["decode_tok_s"]["median"] / hf["decode_tok_s"]["median"], 3)
                                         if both else None)
    labels = {s: recs[0].get("label", "fmstack generate") for (s, _), recs in runs.items()}
    load_start, load_end = load_avg
    return {
        "meta": {
            "mode": "whole-command",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "device": "cpu", "device_name": device_name(torch.device("cpu")),
            "torch": torch.__version__, "python": platform.python_version(), "threads": threads,
            "load_avg_start": list(load_start), "load_avg_end": list(load_end),
            "model": args.model, "new_tokens": args.new_tokens, "repeats": args.repeats, "prompt_text": prompt,
            "generate_args": args.generate_args or "", "fmstack_command": fm.get("command"),
            "fmstack_compile": fm.get("compile"), "fmstack_flags": fm.get("flags"),
            "command": " ".join(sys.argv),
        },
        "systems": {WHOLE_NAMES[s]: {"label": label} for s, label in labels.items()},
        "results": rows,
    }


def format_whole_markdown(report: dict) -> str:
    """The whole-command report as a markdown table (medians, [min-max] over the repeats)."""
    m = report["meta"]
    title = (f"`fmstack generate --max-new-tokens {m['new_tokens']}` ({m['generate_args'] or 'defaults'}: "
             f"compile {m['fmstack_compile']}), {m['model']}, {m['threads']} threads, {m['repeats']} repeat(s), "
             f"load avg {m['load_avg_start'][0]:.2f} -> {m['load_avg_end'][0]:.2f}, {m['device_name']}")
    lines = [title, "",
             "| system | run | wall s | first token s | load s | decode tok/s | tokens | wall vs HF eager |",
             "|---|---|---|---|---|---|---|---:|"]

    def cell(r: dict, key: str, fmt: str) -> str:
        s = r.get(key)
        return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]" if s else "-"

    for r in report["results"]:
        ratio = r["wall_speedup_vs_hf_eager"]
        toks = sorted(set(r["tokens"]))
        lines.append(f"| {r['system']} | {r['phase']} | {cell(r, 'wall_s', '.2f')} | {cell(r, 'ttft_s', '.2f')} | "
                     f"{cell(r, 'load_s', '.2f')} | {cell(r, 'decode_tok_s', '.1f')} | "
                     f"{'/'.join(map(str, toks))} | {f'{ratio:.2f}x' if ratio else '-'} |")
    return "\n".join(lines)
