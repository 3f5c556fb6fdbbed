"""Decode benchmark script: `fmstack bench` (fmstack/commands/bench.py, the `fmstack.bench` package)
with its own entry point, for a source checkout.

    python benchmarks/decode.py --peers hf --out benchmarks/results/decode_cpu.json --plot benchmarks/results/decode_cpu.png
"""

import argparse
import logging
import sys

from fmstack.commands import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/decode.py", description=bench.HELP)
    bench.configure(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
