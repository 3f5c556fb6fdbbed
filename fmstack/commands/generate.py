"""`fmstack generate`: one prompt in, text out (optionally streamed, speculative, as JSON)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from fmstack.bench.whole import EVENTS_ENV
from fmstack.commands.common import (COMPILED_HELP, add_model_args, add_sampling_args, add_speculative_args,
                                     check_speculative_args, load_draft, load_from_args, sampling_params,
                                     want_compile)
from fmstack.errors import FmstackError, ParameterError
from fmstack.generation.generate import Generator
from fmstack.generation.speculative import SpeculativeGenerator
from fmstack.generation.structured import Constraint, compile_constraint

log = logging.getLogger("fmstack")

HELP = "generate text from a prompt"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="prompt text")
    add_model_args(p, compile_default=True, compile_help=COMPILED_HELP)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid under this JSON "
                                                          "schema file (default: unconstrained)")
    add_speculative_args(p)


def _prompt_ids(args: argparse.Namespace, tok) -> list[int]:
    if tok is None:
        raise FmstackError(f"--model {args.model}: this model has no tokenizer, so it cannot take a text prompt")
    text = args.prompt
    if args.chat:
        if not tok.chat_template:
            raise FmstackError(f"--chat: the model {args.model} has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tok.encode(text)


def _json_schema(args: argparse.Namespace, tok) -> Constraint | None:
    """--json-schema FILE compiled for this tokenizer; FmstackError naming the option otherwise."""
    if not args.json_schema:
        return None
    try:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise FmstackError(f"--json-schema {args.json_schema}: cannot read a JSON schema from it ({e})") from None
    try:
        return compile_constraint(tok, "json_schema", schema)
    except ParameterError as e:
        raise FmstackError(f"--json-schema {args.json_schema}: {e}") from None


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    check_speculative_args(args)
    loaded = load_from_args(args)
    prompt_ids = _prompt_ids(args, loaded.tokenizer)
    constraint = _json_schema(args, loaded.tokenizer)
    gen = Generator(loaded.model, loaded.tokenizer, compile=want_compile(args), sdpa_backend=args.sdpa_backend)
    stream = (lambda _row, delta: (sys.stdout.write(delta), sys.stdout.flush())) if args.stream else None
    draft = load_draft(args)
    if draft is not None and constraint is not None:
        raise FmstackError("--json-schema cannot be combined with speculative decoding (--draft-model / "
                           "--draft-quantize)")
    k = 4 if args.speculate_k is None else args.speculate_k
    if draft is not None:
        draft_gen = Generator(draft.model, draft.tokenizer, compile=want_compile(args), sdpa_backend=args.sdpa_backend)
        result = SpeculativeGenerator(gen, draft_gen, k).generate(prompt_ids, params, on_text=stream)
    else:
        result = gen.generate([prompt_ids], params, on_text=stream, constraints=[constraint])[0]
    _bench_event(args, loaded, prompt_ids, result, time.time())
    if args.stream:
        sys.stdout.write("\n")
    if params.max_new_tokens == 0:
        log.warning("--max-new-tokens 0: nothing was generated (the prompt was only read and tokenized)")
    if args.json:
        print(json.dumps(_json_report(args, loaded, prompt_ids, result, draft, k)))
        return 0
    if not args.stream:
        print(result.text)
    log.info("prefill %.3fs, decode %.1f tok/s (%d tokens, %s)", result.prefill_s,
             result.decode_tokens_per_s, len(result.token_ids), cli_finish_reason(result))
    if draft is not None:
        log.info("speculative k=%d: acceptance %.1f%%, %.2f draft tokens accepted per round", k,
                 100 * result.acceptance_rate, result.mean_accepted)
    return 0


def _bench_event(args: argparse.Namespace, loaded, prompt_ids: list[int], result, now: float) -> None:
    """With $FMSTACK_BENCH_EVENTS set (by `fmstack bench --whole-command`): append one JSON line to that
    file, with the wall-clock time the first token was ready and the flags in effect."""
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    flags = {k: v for k, v in vars(args).items() if k not in ("run", "prompt")}
    record = {"system": "fmstack", "first_token_time": now - result.decode_s, "load_s": loaded.load_s,
              "prefill_s": result.prefill_s, "decode_s": result.decode_s, "tokens": len(result.token_ids),
              "prompt_tokens": len(prompt_ids), "compile": want_compile(args), "flags": flags}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def cli_finish_reason(result) -> str:
    """The CLI's finish reasons: "eos" when an EOS token stopped it (the library says "stop" with
    the token id in `stop_reason`), else the library's "stop" (a stop string) or "length"."""
    return "eos" if result.finish_reason == "stop" and isinstance(result.stop_reason, int) else result.finish_reason


def _json_report(args: argparse.Namespace, loaded, prompt_ids: list[int], result, draft, k: int) -> dict:
    report = {
        "model": args.model,
        "model_path": loaded.source,
        "text": result.text,
        "prompt_token_ids": prompt_ids,
        "token_ids": result.token_ids,
        "finish_reason": cli_finish_reason(result),
        "load_s": round(loaded.load_s, 4),
        "prefill_s": round(result.prefill_s, 4),
        "decode_s": round(result.decode_s, 4),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
    }
    if draft is not None:
        report.update({"draft_model": args.draft_model or args.model, "draft_model_path": draft.source,
                       "draft_quantize": args.draft_quantize, "speculate_k": k,
                       "acceptance_rate": round(result.acceptance_rate, 4),
                       "mean_accepted": round(result.mean_accepted, 4)})
    return report
