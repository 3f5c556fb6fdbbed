"""`fmstack bench`: the decode/prefill speed benchmark (the measuring lives in `fmstack.bench`)."""

from __future__ import annotations

import argparse

from fmstack import bench

HELP = "decode/prefill speed benchmark, optionally against HF transformers (--peers hf)"


def configure(p: argparse.ArgumentParser) -> None:
    bench.configure(p)


def run(args: argparse.Namespace) -> int:
    report = bench.run(args)
    if report is not None:  # None on the ranks of a torchrun job that do not report
        print(bench.format_table(report))
    return 0
