"""`fmstack bench`: the decode/prefill speed benchmark; the measuring lives in the `fmstack.bench`
package. Unlike the other commands, --compile is on by default: the benchmark measures steady-state
decoding, and its untimed warm-up pays for the compilation. `--whole-command` measures instead what a
user waits for: whole `fmstack generate` processes, cold and warm, beside peers' scripts
(`fmstack.bench.whole`)."""

from __future__ import annotations

import argparse

from fmstack.bench.plot import write_outputs
from fmstack.bench.report import format_table, format_whole_markdown
from fmstack.bench.run import run as run_bench
from fmstack.bench.whole import run_whole
from fmstack.commands.common import add_model_args, add_speculative_args

HELP = "decode/prefill speed benchmark, optionally against HF transformers (--peers hf)"
DEFAULT_BATCH_SIZES = "1,2,4,8,16"


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of `fmstack bench` (also `python benchmarks/decode.py`)."""
    add_model_args(p, compile_default=True, several_quantize=True,
                   compile_help="compile fmstack's decode (and run the HF static+compile peer) (default: on)")
    p.add_argument("--decode-compiler", default="generator", choices=["generator", "stock"],
                   help="with --compile: 'generator' = Generator(compile=True) as is (on CPU, batch-1 matmuls "
                        "lowered to streaming reductions); 'stock' = matmuls left to BLAS "
                        "(Generator(gemv_max_rows=0), the A/B of the CPU study) (default generator)")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES, help=f"comma list (default {DEFAULT_BATCH_SIZES})")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per row (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system and batch size (default 3)")
    p.add_argument("--warmup-tokens", type=int, default=8,
                   help="tokens of the untimed warm-up run per system and batch size (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--peers", default="",
                   help="comma list of peer systems to run in the same process: hf (HF transformers eager, and "
                        "static cache + compile with --compile), llamacpp (llama-cpp-python on the same GGUF, "
                        "batch 1; pip install llama-cpp-python) (default: none)")
    add_speculative_args(p)  # speculative decoding (batch 1) compared with plain decoding of the same target
    p.add_argument("--prompt", default="random", choices=["random", "text"],
                   help="prompt tokens: random ids, or a fixed English passage (needs the model's tokenizer; "
                        "what speculative decoding should be measured on) (default random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--whole-command", action="store_true",
                   help="time whole processes instead, start to exit: `fmstack generate --max-new-tokens "
                        "NEW_TOKENS TEXT` cold (empty caches) and warm, and with --peers the same from an HF "
                        "transformers / llama-cpp-python script; prints a markdown table (default: off)")
    p.add_argument("--generate-args", default="", metavar="ARGS",
                   help="with --whole-command: extra flags for `fmstack generate`, one string "
                        "(e.g. '--compile --quantize int8'; '--ignore-eos' applies to the peers too) (default: none)")
    p.add_argument("--text", default=None,
                   help="with --whole-command: the prompt text (default: a fixed English sentence)")
    p.add_argument("--out", default=None, help="write the results as JSON here (default: not written)")
    p.add_argument("--plot", default=None, help="write a PNG (tok/s vs batch size) here; needs matplotlib (default: no plot)")


def run(args: argparse.Namespace) -> int:
    if args.whole_command:
        report = run_whole(args)
        write_outputs(report, args.out, None, None)
        print(format_whole_markdown(report))
        return 0
    report = run_bench(args)
    if report is not None:  # None on the ranks of a torchrun job that do not report
        print(format_table(report))
    return 0
