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
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


@command("generate", "generate text from a prompt", _configure_generate)
def cmd_generate(args: argparse.Namespace) -> int:
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.loading import load_model

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    tok = loaded.tokenizer
    if tok is None:
        raise FmstackError(f"--model {args.model}: this model has no tokenizer, so it cannot take a text prompt")
    text = args.prompt
    if args.chat:
        if not tok.chat_template:
            raise FmstackError(f"--chat: the model {args.model} has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    prompt_ids = tok.encode(text)
    gen = Generator(loaded.model, tok)
    stream = None if args.json else (lambda _row, delta: (sys.stdout.write(delta), sys.stdout.flush()))
    result = gen.generate([prompt_ids], params, on_text=stream)[0]
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
        }))
    else:
        sys.stdout.write("\n")
        log.info("prefill %.3fs, decode %.1f tok/s (%d tokens, %s)", result.prefill_s,
                 result.decode_tokens_per_s, len(result.token_ids), result.finish_reason)
    return 0


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
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except FmstackError as e:
        print(f"fmstack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
