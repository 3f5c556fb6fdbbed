"""fmstack's own systems in the benchmark: `Generator.generate` (greedy, no tokenizer, so no
detokenization in the timed loop) per weight mode, and speculative decoding of the plain model."""

from __future__ import annotations

from fmstack.bench.measure import Run, System, sync
from fmstack.generation.compile import GEMV_MAX_ROWS
from fmstack.generation.generate import Generator
from fmstack.generation.sampling import SamplingParams
from fmstack.generation.speculative import SpeculativeGenerator, check_same_tokenizer
from fmstack.loading import load_model, param_bytes


def fmstack_system(args, device, dtype, quantize: str | None = None) -> System:
    """`Generator` on --model with weight mode `quantize` (None: as loaded), compiled with --compile;
    --decode-compiler stock leaves its decode matmuls to BLAS (`gemv_max_rows=0`)."""
    loaded = load_model(args.model, device=device, dtype=dtype, parallel=args.parallel,
                        quantize=quantize, group_size=args.group_size)
    stock = args.compile and args.decode_compiler == "stock"
    gen = Generator(loaded.model, None, eos_ids=[], compile=args.compile, sdpa_backend=args.sdpa_backend,
                    gemv_max_rows=0 if stock else GEMV_MAX_ROWS)
    label = "fmstack (compiled)" if args.compile else "fmstack (eager)"
    if stock:
        label = "fmstack (compiled, stock Inductor decode)"

    def generate(prompts, new_tokens: int) -> Run:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        sync(device)
        res = gen.generate(prompts.tolist(), params)
        sync(device)
        assert all(len(r.token_ids) == new_tokens for r in res)
        return Run(res[0].prefill_s, res[0].decode_s, new_tokens - 1, len(res))

    name = "fmstack" if quantize is None else f"fmstack-{quantize}"
    if quantize is not None:
        label += f" {quantize}" + (f" g{args.group_size}" if quantize == "int4" else "")
    system = System(name, label, param_bytes(loaded.model), loaded.load_s, loaded.config.vocab_size, generate)
    system.extra.update(generator=gen, tokenizer=loaded.tokenizer,
                        sdpa_backend=gen.decode_sdpa_backend(1, args.prompt_len + args.new_tokens))
    return system


def speculative_system(args, device, dtype, target: System, k: int) -> System:
    """Speculative decoding (batch 1, `k` draft tokens per round) of the plain fmstack target with
    --draft-model/--draft-quantize. Both generators run without a tokenizer (no detokenization in the
    timed loop); the tokenizers are checked here instead."""
    draft = load_model(args.draft_model or args.model, device=device, dtype=dtype, quantize=args.draft_quantize,
                       group_size=args.group_size)
    tgt_gen = target.extra["generator"]
    dgen = Generator(draft.model, None, eos_ids=[], compile=args.compile, sdpa_backend=args.sdpa_backend)
    check_same_tokenizer(target.extra["tokenizer"], draft.tokenizer, target.vocab_size, draft.config.vocab_size)
    spec = SpeculativeGenerator(tgt_gen, dgen, k)
    counts = {"proposed": 0, "accepted": 0, "rounds": 0}

    def generate(prompts, new_tokens: int) -> Run:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        sync(device)
        res = spec.generate(prompts[0].tolist(), params)
        sync(device)
        assert len(res.token_ids) == new_tokens
        for key in counts:
            counts[key] += getattr(res, key)
        return Run(res.prefill_s, res.decode_s, new_tokens - 1, 1)

    draft_name = (args.draft_model or "target") + (f" {args.draft_quantize}" if args.draft_quantize else "")
    system = System("fmstack-spec", f"fmstack speculative, k={k}, draft {draft_name}",
                    param_bytes(draft.model), draft.load_s, target.vocab_size, generate, max_batch=1)
    system.extra["counts"] = counts
    return system
