"""`fmstack` command line. User errors print one line (`fmstack: error: ...`) and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from fmstack.errors import FmstackError

log = logging.getLogger("fmstack")

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register `run(args) -> exit code` as sub-command `name`; `configure(parser)` adds its arguments."""
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (configure, run)
        run.help = help
        return run
    return register


def add_model_args(p: argparse.ArgumentParser) -> None:
    from fmstack.checkpoints.named import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registry name, checkpoint path (.gguf, HF dir, Meta dir) or random:<config> "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="run dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model calls (default: on for CUDA, off for CPU, where a one-off "
                        "run spends longer compiling than it saves)")
    p.add_argument("--sdpa-backend", default="auto", choices=["auto", "math", "flash", "efficient", "cudnn"],
                   help="restrict scaled_dot_product_attention to one backend (default auto)")
    p.add_argument("--parallel", default="none", choices=["none", "tp", "pp", "cp"],
                   help="split the model over the ranks of a torchrun job: tp (tensor parallel), pp "
                        "(pipeline parallel) or cp (context parallel: ring attention, the sequence and "
                        "KV cache split); launch with torchrun --nproc-per-node N -m fmstack ...")
    add_quant_args(p)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the projections at load (weight-only; int4 is group-wise)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64, 128 or 256 (default 32)")


def load_from_args(args: argparse.Namespace):
    """The model named by the common model arguments, loaded (and quantized) as they say."""
    from fmstack.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype,
                      quantize=getattr(args, "quantize", None), group_size=getattr(args, "group_size", 32),
                      parallel=getattr(args, "parallel", None))


def want_compile(args: argparse.Namespace) -> bool:
    """--compile/--no-compile, or the device default (on for CUDA)."""
    return args.compile if args.compile is not None else args.device.startswith("cuda")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="prompt text")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    add_speculative_args(p)


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft-model", default=None,
                   help="draft model (same tokenizer as --model) proposing --speculate-k tokens per round")
    g.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="draft with a quantized copy of the target (or of --draft-model when given)")
    g.add_argument("--speculate-k", type=int, default=None,
                   help="draft tokens proposed per round, 1..16 (default 4 when a draft is set)")


def check_speculative_args(args: argparse.Namespace) -> None:
    from fmstack.errors import ParameterError
    from fmstack.generation.speculative import MAX_SPECULATE_K

    has_draft = args.draft_model is not None or args.draft_quantize is not None
    if args.speculate_k is not None and not has_draft:
        raise ParameterError("--speculate-k needs a draft: pass --draft-model M and/or --draft-quantize int8|int4")
    if args.speculate_k is not None and not 1 <= args.speculate_k <= MAX_SPECULATE_K:
        raise ParameterError(f"--speculate-k {args.speculate_k} is invalid: must be in [1, {MAX_SPECULATE_K}]")
    if has_draft and getattr(args, "parallel", "none") not in (None, "none"):
        raise ParameterError("--draft-model/--draft-quantize cannot be combined with --parallel")


def load_draft(args: argparse.Namespace, target):
    """The draft model for --draft-model/--draft-quantize, or None when speculative decoding is off."""
    from fmstack.errors import ParameterError
    from fmstack.loading import load_model

    if args.draft_model is None and args.draft_quantize is None:
        return None
    spec = args.draft_model or args.model
    return load_model(spec, device=args.device, dtype=args.dtype, quantize=args.draft_quantize,
                      group_size=args.group_size)


@command("generate", "generate text from a prompt", _configure_generate)
def cmd_generate(args: argparse.Namespace) -> int:
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    check_speculative_args(args)
    loaded = load_from_args(args)
    tok = loaded.tokenizer
    if tok is None:
        raise FmstackError(f"--model {args.model}: this model has no tokenizer, so it cannot take a text prompt")
    text = args.prompt
    if args.chat:
        if not tok.chat_template:
            raise FmstackError(f"--chat: the model {args.model} has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    prompt_ids = tok.encode(text)
    gen = Generator(loaded.model, tok, compile=want_compile(args), sdpa_backend=args.sdpa_backend)
    stream = (lambda _row, delta: (sys.stdout.write(delta), sys.stdout.flush())) if args.stream else None
    draft = load_draft(args, loaded)
    if draft is not None:
        from fmstack.generation.speculative import SpeculativeGenerator

        draft_gen = Generator(draft.model, draft.tokenizer, compile=want_compile(args), sdpa_backend=args.sdpa_backend)
        k = 4 if args.speculate_k is None else args.speculate_k
        result = SpeculativeGenerator(gen, draft_gen, k).generate(prompt_ids, params, on_text=stream)
    else:
        result = gen.generate([prompt_ids], params, on_text=stream)[0]
    if args.stream:
        sys.stdout.write("\n")
    if args.json:
        print(json.dumps({
            "model": loaded.source,
            "text": result.text,
            "prompt_token_ids": prompt_ids,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "load_s": round(loaded.load_s, 4),
            "prefill_s": round(result.prefill_s, 4),
            "decode_s": round(result.decode_s, 4),
            "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
            **({"draft_model": draft.source, "draft_quantize": args.draft_quantize, "speculate_k": k,
                "acceptance_rate": round(result.acceptance_rate, 4),
                "mean_accepted": round(result.mean_accepted, 4)} if draft is not None else {}),
        }))
    else:
        if not args.stream:
            print(result.text)
        log.info("prefill %.3fs, decode %.1f tok/s (%d tokens, %s)", result.prefill_s,
                 result.decode_tokens_per_s, len(result.token_ids), result.finish_reason)
        if draft is not None:
            log.info("speculative k=%d: acceptance %.1f%%, %.2f draft tokens accepted per round", k,
                     100 * result.acceptance_rate, result.mean_accepted)
    return 0


def _positive(name: str, value: int | None) -> None:
    from fmstack.errors import ParameterError

    if value is not None and value <= 0:
        raise ParameterError(f"{name} {value} is invalid: must be >= 1")


def _configure_eval(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    hs = sub.add_parser("hellaswag", help="HellaSwag zero-shot acc / acc_norm (lm-eval convention)")
    add_model_args(hs)
    hs.add_argument("--data", required=True, help="HellaSwag JSONL file (e.g. hellaswag_val.jsonl)")
    hs.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    hs.add_argument("--batch-size", type=int, default=32, help="rows per forward (default 32)")
    hs.add_argument("--output", default=None, help="write per-row predictions (JSON lines) here")
    hs.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    pp = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    add_model_args(pp)
    pp.add_argument("--text", required=True, help="UTF-8 text file")
    pp.add_argument("--max-length", type=int, default=None, help="window length in tokens (default: model context)")
    pp.add_argument("--stride", type=int, default=None, help="window step in tokens (default: --max-length)")
    pp.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    pp.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


@command("eval", "evaluate a model: hellaswag, perplexity", _configure_eval)
def cmd_eval(args: argparse.Namespace) -> int:
    from fmstack.loading import load_model

    _positive("--batch-size", args.batch_size)
    if args.eval_task == "hellaswag":
        from fmstack.eval import hellaswag

        _positive("--limit", args.limit)
        docs = hellaswag.load_docs(args.data, args.limit)
        loaded = load_from_args(args)
        result = hellaswag.evaluate(loaded.model, loaded.tokenizer, docs, batch_size=args.batch_size,
                                    compile=want_compile(args), progress=True)
        if args.output:
            result.write_predictions(args.output)
        m = result.metrics
        out = {"task": "hellaswag", "model": loaded.source, "dtype": args.dtype, **m}
        fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
        print(f"hellaswag  n={m['n']}  acc={fmt(m['acc'])} ± {fmt(m['acc_stderr'])}  "
              f"acc_norm={fmt(m['acc_norm'])} ± {fmt(m['acc_norm_stderr'])}  "
              f"({m['rows_per_s']:.2f} rows/s, {m['tokens_per_s']:.0f} tokens/s, {m['seconds']:.1f}s)")
    else:
        from fmstack.eval import perplexity

        _positive("--max-length", args.max_length)
        _positive("--stride", args.stride)
        text = perplexity.read_text(args.text)
        loaded = load_from_args(args)
        m = perplexity.perplexity(loaded.model, loaded.tokenizer, text, max_length=args.max_length,
                                  stride=args.stride, batch_size=args.batch_size, progress=True).metrics
        out = {"task": "perplexity", "model": loaded.source, "dtype": args.dtype, **m}
        print(f"perplexity={m['perplexity']:.4f}  bits_per_byte={m['bits_per_byte']:.4f}  "
              f"word_perplexity={m['word_perplexity']:.3f}  ({m['tokens']} tokens, {m['windows']} windows, "
              f"{m['tokens_per_s']:.0f} tokens/s)")
    if args.json:
        print(json.dumps(out))
    return 0


def _configure_bench(p: argparse.ArgumentParser) -> None:
    from fmstack import bench

    bench.configure(p)


@command("bench", "decode/prefill speed benchmark, optionally against HF transformers (--peers hf)",
         _configure_bench)
def cmd_bench(args: argparse.Namespace) -> int:
    from fmstack import bench

    report = bench.run(args)
    if report is not None:  # None on the ranks of a torchrun job that do not report
        print(bench.format_table(report))
    return 0


def _configure_quantize(p: argparse.ArgumentParser) -> None:
    from fmstack.checkpoints.named import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to quantize (default: {DEFAULT_MODEL})")
    p.add_argument("--mode", required=True, choices=["int8", "int4", "gptq"],
                   help="int8 per channel, int4 group-wise round-to-nearest, or gptq (int4, calibrated)")
    p.add_argument("--group-size", type=int, default=32, help="int4/gptq group size (default 32)")
    p.add_argument("--calib", default=None, help="gptq: calibration text (.txt) or JSONL (ctx/text fields)")
    p.add_argument("--calib-samples", type=int, default=128, help="gptq: calibration windows (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="gptq: tokens per window (default 256)")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--out", required=True, help="output directory (safetensors + config + tokenizer)")


@command("quantize", "write a weight-quantized checkpoint (int8, int4, gptq)", _configure_quantize)
def cmd_quantize(args: argparse.Namespace) -> int:
    from fmstack.checkpoints.native import save_checkpoint
    from fmstack.loading import load_model
    from fmstack.quant import QuantSpec, quantize_model

    spec = QuantSpec(args.mode, args.group_size)
    if args.mode == "gptq" and not args.calib:
        raise FmstackError("--mode gptq needs --calib FILE (any text; e.g. the HellaSwag dev contexts)")
    loaded = load_model(args.model)
    keep: dict = {}
    if args.mode == "gptq":
        from fmstack.quant.gptq import calibration_ids, gptq_quantize

        if loaded.tokenizer is None:
            raise FmstackError(f"--model {args.model} has no tokenizer to read the calibration text with")
        ids = calibration_ids(loaded.tokenizer, args.calib, n_samples=args.calib_samples, seq_len=args.calib_seq_len)
        gptq_quantize(loaded.model, ids, spec, act_order=args.act_order, keep=keep, head="gptq")
    else:
        quantize_model(loaded.model, spec, keep=keep)
    out = save_checkpoint(args.out, loaded.model, loaded.tokenizer, quantized=keep, source=loaded.source)
    log.info("wrote %s (%s)", out, spec.mode)
    return 0


def _configure_finetune(p: argparse.ArgumentParser) -> None:
    from fmstack.train import command as finetune

    finetune.configure(p)


@command("finetune", "fine-tune a model (full or LoRA) on text / JSONL data; torchrun for data parallel",
         _configure_finetune)
def cmd_finetune(args: argparse.Namespace) -> int:
    from fmstack.train import command as finetune

    summary = finetune.run(args)
    print(json.dumps(summary) if args.json else finetune.format_summary(summary))
    return 0


def _configure_serve(p: argparse.ArgumentParser) -> None:
    from fmstack.serve import server

    server.configure(p)


@command("serve", "OpenAI-compatible HTTP server (continuous batching, paged KV cache)", _configure_serve)
def cmd_serve(args: argparse.Namespace) -> int:
    from fmstack.serve import server

    return server.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmstack", description="PyTorch-native LLaMA-family inference stack")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=run.help, description=run.help)
        configure(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    parallel = getattr(args, "parallel", "none") not in (None, "none")
    prog = "fmstack"
    if parallel:  # torchrun: rank 0 alone prints; the others log warnings and errors only
        from fmstack.parallel import dist

        prog, level = dist.setup_rank_output(prog, level)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        rc = args.run(args)
        if parallel:
            dist.shutdown()
        return rc
    except FmstackError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        msg = dist.failure_message(e) if parallel else None
        if msg is None:
            raise
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 3
    finally:
        if parallel:  # reported (or done): a SIGTERM from torchrun now just ends the process
            dist.restore_sigterm()
