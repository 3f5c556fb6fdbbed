"""`fmstack doctor`: what this machine offers fmstack (the facts come from `fmstack.doctor`)."""

from __future__ import annotations

import argparse
import json

from fmstack import doctor

HELP = "show the torch build, CPU/GPU, threads, caches, optional parts and the default model"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")


def run(args: argparse.Namespace) -> int:
    facts = doctor.collect()
    print(json.dumps(facts) if args.json else doctor.format_report(facts))
    return 0
