"""Arguments shared by every command that runs a model: one definition, one set of defaults."""

from __future__ import annotations

import argparse

from fmstack.checkpoints.named import DEFAULT_MODEL
from fmstack.errors import ParameterError
from fmstack.generation.compile import compile_by_default
from fmstack.generation.sampling import SamplingParams
from fmstack.generation.speculative import MAX_SPECULATE_K
from fmstack.loading import LoadedModel, load_model
from fmstack.quant import ALL_MODES


DTYPES = ("fp32", "bf16", "fp16")
PARALLEL_MODES = ("none", "tp", "pp", "cp")
PARALLEL_HELP = ("split the model over the ranks of a torchrun job: tp (tensor parallel), pp (pipeline parallel) "
                 "or cp (context parallel: ring attention, the sequence and KV cache split); launch with torchrun "
                 "--nproc-per-node N -m fmstack ... (default none)")
COMPILE_HELP = ("torch.compile the model calls (default: on for CUDA, off for CPU, where a one-off run spends "
                "longer compiling than it saves)")
COMPILED_HELP = ("torch.compile the model calls (default: on, off where $FMSTACK_COMPILE=0; the first run compiles "
                 "once, later runs load the compiled steps from the compile cache, see `fmstack cache info`)")


def add_model_args(p: argparse.ArgumentParser, *, model_help: str = "registry name, checkpoint path (.gguf, HF "
                   "dir, Meta dir) or random:<config>", dtypes: tuple[str, ...] = DTYPES,
                   dtype_help: str = "run dtype", compile_help: str = COMPILE_HELP,
                   parallel: tuple[str, ...] = PARALLEL_MODES, parallel_default: str = "none",
                   parallel_help: str = PARALLEL_HELP, runtime: bool = True,
                   compile_default: bool | None = None, several_quantize: bool = False) -> None:
    """--model --dtype --device --compile --parallel, and with `runtime` --sdpa-backend and --quantize.

    Commands differ only through the parameters: the dtypes they accept (finetune trains fp32 or bf16),
    the parallel modes they offer, what their --compile compiles and its default (`compile_default`
    None: on for CUDA, off for CPU, see `want_compile`), and whether --quantize takes a comma list of
    modes to compare (`several_quantize`, the benchmark)."""
    add_model_name_arg(p, model_help)
    p.add_argument("--dtype", default="fp32", choices=list(dtypes), help=f"{dtype_help} (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    if compile_default:
        compile_default = compile_by_default()
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile_default, help=compile_help)
    p.add_argument("--parallel", default=parallel_default, choices=list(parallel), help=parallel_help)
    if runtime:
        p.add_argument("--sdpa-backend", default="auto", choices=["auto", "math", "flash", "efficient", "cudnn"],
                       help="restrict scaled_dot_product_attention to one backend (default auto)")
        add_quant_args(p, several=several_quantize)


def add_model_name_arg(p: argparse.ArgumentParser, model_help: str) -> None:
    """--model alone (for commands that load the model their own way, e.g. quantize)."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{model_help} (default: {DEFAULT_MODEL})")


QUANTIZE_CHOICES = ("none", "int8", "int4") + tuple(m for m in ALL_MODES if m not in ("int8", "int4", "gptq"))
QUANTIZE_HELP = ("none: float weights (a GGUF is dequantized); int8 (per channel) / int4 (group-wise): "
                 "weight-only, quantized at load; gguf: a quantized GGUF's own blocks (Q8_0, Q4_0, Q4_1, Q4_K, "
                 "Q5_K, Q6_K) kept as they are, same logits as the dequantized model; gguf-a8: gguf with int8 "
                 "activations; w8a8 / w4a8: int8 per-channel / int4 group-32 weights in the block layout with "
                 "int8 activations")


def add_quant_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """--quantize (one mode, or with `several` a comma list of QUANTIZE_CHOICES, default none) and --group-size."""
    if several:
        p.add_argument("--quantize", default="none",
                       help=f"comma list of weight modes, one run each: {', '.join(QUANTIZE_CHOICES)}. "
                            f"{QUANTIZE_HELP} (default none)")
    else:
        p.add_argument("--quantize", choices=list(QUANTIZE_CHOICES), default=None,
                       help=f"{QUANTIZE_HELP} (default: gguf for a quantized GGUF run in fp32 on one CPU "
                            "process, its 94 MB of blocks instead of 513 MB of dequantized fp32 for the default "
                            "model; none otherwise)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64, 128 or 256 (default 32)")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    """The model named by the common model arguments, loaded (and quantized) as they say (no --quantize:
    "auto", see `load_model`)."""
    return load_model(args.model, device=args.device, dtype=args.dtype,
                      quantize=getattr(args, "quantize", None) or "auto", group_size=getattr(args, "group_size", 32),
                      parallel=getattr(args, "parallel", None))


def want_compile(args: argparse.Namespace) -> bool:
    """--compile/--no-compile, or the device default (on for CUDA)."""
    return args.compile if args.compile is not None else args.device.startswith("cuda")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens; 0 = off (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, a fresh draw each run)")
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable (default: none)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than MIN_P x the most likely one; 0 = off (default 0.0)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token already generated, in [-2, 2] (default 0.0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per occurrence of a token already generated, in [-2, 2] (default 0.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides positive / multiplies negative logits of tokens in the prompt or output; "
                        "> 0, 1 = off (default 1.0)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="EOS cannot end the output before this many tokens (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (default: stop)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling options as SamplingParams; an invalid one is reported under its option name."""
    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), min_p=args.min_p,
                              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                              repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens,
                              ignore_eos=args.ignore_eos)
    except ParameterError as e:
        if e.field is None:
            raise
        value = list(e.value) if e.field == "stop" else e.value
        raise ParameterError(f"--{e.field.replace('_', '-')} {value} is invalid: {e.allowed}") from None


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft-model", default=None,
                   help="draft model (same tokenizer as --model) proposing --speculate-k tokens per round "
                        "(default: none)")
    g.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="draft with a quantized copy of the target (or of --draft-model when given; default: "
                        "none)")
    g.add_argument("--speculate-k", type=int, default=None,
                   help="draft tokens proposed per round, 1..16 (default 4 when a draft is set)")


def check_speculative_args(args: argparse.Namespace) -> None:
    has_draft = args.draft_model is not None or args.draft_quantize is not None
    if args.speculate_k is not None and not has_draft:
        raise ParameterError("--speculate-k needs a draft: pass --draft-model M and/or --draft-quantize int8|int4")
    if args.speculate_k is not None and not 1 <= args.speculate_k <= MAX_SPECULATE_K:
        raise ParameterError(f"--speculate-k {args.speculate_k} is invalid: must be in [1, {MAX_SPECULATE_K}]")
    if has_draft and getattr(args, "parallel", "none") not in (None, "none"):
        raise ParameterError("--draft-model/--draft-quantize cannot be combined with --parallel")


def load_draft(args: argparse.Namespace) -> LoadedModel | None:
    """The draft model for --draft-model/--draft-quantize, or None when speculative decoding is off."""
    if args.draft_model is None and args.draft_quantize is None:
        return None
    spec = args.draft_model or args.model
    return load_model(spec, device=args.device, dtype=args.dtype, quantize=args.draft_quantize,
                      group_size=args.group_size)


def positive(name: str, value: int | None) -> None:
    """Refuse a value <= 0 for option `name` (None means unset and passes)."""
    if value is not None and value <= 0:
        raise ParameterError(f"{name} {value} is invalid: must be >= 1")
