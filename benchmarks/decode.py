"""Decode benchmark script; the implementation is `fmstack.bench` (also `fmstack bench`).

    python benchmarks/decode.py --peers hf --out benchmarks/results/decode_cpu.json --plot benchmarks/results/decode_cpu.png
"""

import argparse
import logging
import sys

from fmstack import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/decode.py", description=bench.__doc__.splitlines()[0])
    bench.configure(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    report = bench.run(args)
    if report is not None:
        print(bench.format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
