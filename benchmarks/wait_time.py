"""What a user waits for: `fmstack bench --whole-command` (fmstack/bench/whole.py) with its own entry
point and this project's defaults: `fmstack generate --max-new-tokens 256 PROMPT` as whole processes,
cold and warm, beside HF transformers eager and llama-cpp-python scripts on the same GGUF, 2 threads.

    python benchmarks/wait_time.py --out benchmarks/results/wait_time_cpu.json
    python benchmarks/wait_time.py --new-tokens 64 --repeats 1 --peers hf     # a short check
"""

import argparse
import logging
import sys

from fmstack.commands import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/wait_time.py", description=__doc__.split("\n\n")[0])
    bench.configure(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(whole_command=True, new_tokens=256, threads=2, repeats=3, peers="hf,llamacpp")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
