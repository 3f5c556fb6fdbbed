"""Decode benchmark script; the implementation is `fmstack.bench` (also `fmstack bench`).

    python benchmarks/decode.py --peers hf --out benchmarks/results/decode_cpu.json --plot benchmarks/results/decode_cpu.png
"""

import sys

from fmstack.bench import main

if __name__ == "__main__":
    sys.exit(main())
