"""The benchmark's outputs: the JSON file, and the plot of decode tok/s against batch size, one line
per system (matplotlib, optional)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from fmstack.errors import FmstackError

log = logging.getLogger("fmstack.bench")


def write_outputs(report: dict, out: str | None, png: str | None, plot_fn: Callable[[dict, str], None]) -> None:
    """Write `report` as JSON to `out` and `plot_fn(report, png)` to `png` (each when given): the
    outputs of `fmstack bench --out/--plot` and of the benchmark scripts."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
        log.info("wrote %s", out)
    if png:
        plot_fn(report, png)
        log.info("wrote %s", png)


def require_matplotlib() -> None:
    """Fail before a long benchmark, not after it, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FmstackError("--plot needs matplotlib: pip install 'fmstack[bench]'") from None


def plot(report: dict, path: str) -> None:
    """tok/s vs batch size, one line per system, min-max error bars (matplotlib, Agg)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["meta"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, info in report["systems"].items():
        rows = [r for r in report["results"] if r["system"] == name]
        xs = [r["batch_size"] for r in rows]
        med = [r["decode_tok_s"]["median"] for r in rows]
        lo = [r["decode_tok_s"]["median"] - r["decode_tok_s"]["min"] for r in rows]
        hi = [r["decode_tok_s"]["max"] - r["decode_tok_s"]["median"] for r in rows]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=info["label"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(m["batch_sizes"])
    ax.set_xticklabels([str(b) for b in m["batch_sizes"]])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (all rows; median, min-max bars)")
    load = m["load_avg_start"]
    ax.set_title(f"{m['model']} {m['dtype']}, {m['device_name'][:60]}\n{m['threads']} threads, torch {m['torch']}"
                 + (f", load avg {load[0]:.1f}" if load else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
