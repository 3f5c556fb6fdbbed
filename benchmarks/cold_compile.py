"""Cold compile of the default model's generation graphs in one process: load, then the first
generate (prefill + decode graphs compiled), with torch's own per-phase times and the CPU seconds of
this process and of the compiler processes it started.

Run it with an empty compile cache (the native kernels may be built already: their one-time build is
not a compile of the model):

    mkdir -p /tmp/cold/kernels && cp -r ~/.cache/fmstack/kernels/* /tmp/cold/kernels/
    FMSTACK_CACHE_DIR=/tmp/cold python benchmarks/cold_compile.py [QUANTIZE]   # default: auto (GGUF blocks)
"""

import resource
import sys
import time

t0 = time.perf_counter()

from torch._dynamo.utils import compile_times  # noqa: E402

from fmstack.generation.generate import Generator  # noqa: E402
from fmstack.generation.sampling import SamplingParams  # noqa: E402
from fmstack.loading import load_model  # noqa: E402


def main() -> None:
    quantize = sys.argv[1] if len(sys.argv) > 1 else "auto"
    lm = load_model("smollm2-135m-instruct", quantize=quantize)
    t1 = time.perf_counter()
    gen = Generator(lm.model, lm.tokenizer, compile=True)
    gen.generate([list(range(1, 40))], SamplingParams(temperature=0, max_new_tokens=4))
    t2 = time.perf_counter()
    print("load %.1f s, first tokens (prefill+decode compile) %.1f s" % (t1 - t0, t2 - t1))
    names, values = compile_times(repr="csv", aggregate=True)
    for name, value in zip(names, values):
        try:
            if float(value) > 0.5:
                print(f"  {name}: {value}")
        except ValueError:
            pass
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print("cpu self %.1f children %.1f" % (me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime))


if __name__ == "__main__":
    main()
