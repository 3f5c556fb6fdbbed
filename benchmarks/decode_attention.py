"""One decode token's attention over one layer's static KV cache at SmolLM2-135M's shapes (9 query
heads, 3 kv heads, head size 64): fmstack's native kernel (`torch.ops.fmstack.decode_attention`,
visible keys only) against SDPA under the same mask (`fmstack.models.llama.sdpa`, CPU flash kernel),
eager, per cache length and filled length, 1 and 2 threads, both measured in the same run, interleaved.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_cpu.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmstack import native  # noqa: E402
from fmstack.models.llama import sdpa  # noqa: E402

CASES = [(256, 192), (1024, 192), (1024, 960)]  # (cache slots S, filled slots)


def time_us(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean wall time of `calls` calls, in microseconds."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not native.available():
        sys.exit("the native kernels are unavailable: " + str(native._state.get("error")))
    g = torch.Generator().manual_seed(0)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for S, filled in CASES:
            q, k, v = torch.randn(1, 9, 1, 64, generator=g), torch.randn(1, 3, S, 64, generator=g), \
                torch.randn(1, 3, S, 64, generator=g)
            visible = (torch.arange(S) < filled)[None, None, None, :]
            err = (native.decode_attention(q, k, v, visible, 0.125) - sdpa(q, k, v, mask=visible)).abs().max().item()
            nat = time_us(lambda: native.decode_attention(q, k, v, visible, 0.125), args.calls, args.repeats)
            ref = time_us(lambda: sdpa(q, k, v, mask=visible), args.calls, args.repeats)
            rows.append({"threads": threads, "cache_slots": S, "filled": filled, "native_us": round(nat, 1),
                         "sdpa_us": round(ref, 1), "speedup": round(ref / nat, 2), "max_abs_diff": err})
            print(f"threads {threads} S {S:5d} filled {filled:4d}: native {nat:7.1f} us  sdpa {ref:7.1f} us  "
                  f"({ref / nat:.2f}x)  max |diff| {err:.1e}")
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__, "isa": native.isa(),
            "load_avg": list(os.getloadavg()), "command": " ".join(sys.argv),
            "note": "eager calls from Python: each figure includes ~4-5 us of call overhead"}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
