"""Decode benchmark: fmstack against HF transformers on the same model, prompt and threads.

Measures, per system and batch size: decode tok/s (all rows), ms per decode step, prefill tok/s,
time to first token, achieved weight bandwidth (weight bytes x decode steps/s; at batch 1 this is
weight bytes x tok/s), peak memory (process RSS on CPU, torch.cuda.max_memory_allocated on CUDA) and
what torch.compile compiled in the warm-up and in the timed runs (`compiles`; the timed runs should
compile nothing).

Systems:
  fmstack        `Generator.generate` (greedy, no tokenizer so no detokenization), compiled unless
                 --no-compile.
  hf-eager       (--peers hf) `LlamaForCausalLM` built from the same checkpoint, plain argmax loop over
                 its DynamicCache (prefill with logits_to_keep=1). For random:<config> models, an HF
                 model of the same shape with HF's own random weights, built on the device (speed only).
  hf-static      (--peers hf, with --compile) HF `StaticCache`, eager prefill, decode through
                 `torch.compile(model.forward, fullgraph=True)`, i.e. what `generate(...,
                 cache_implementation="static")` does on GPUs (on CPU, HF does not auto-compile).

All systems are loaded first and then measured interleaved (for each batch size and repeat, every
system once), so machine load drifts hit all of them alike. Every row's prompt has exactly
--prompt-len random tokens (no padding) and every system generates --new-tokens tokens per row,
EOS ignored. Both loops copy the new token ids to the host every step (a streaming server must).

    fmstack bench --peers hf --out benchmarks/results/decode_cpu.json --plot benchmarks/results/decode_cpu.png
    fmstack bench --model random:tiny-mha --batch-sizes 1,2 --new-tokens 4 --no-compile
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = "1,2,4,8,16"


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of `fmstack bench` (also `python benchmarks/decode.py`)."""
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="registry name, checkpoint path or random:<config> (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="run dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile fmstack's decode (and run the HF static+compile peer); default on")
    p.add_argument("--decode-compiler", default="generator", choices=["generator", "stock"],
                   help="with --compile: 'generator' = Generator(compile=True) as is (on CPU, batch-1 matmuls "
                        "lowered to streaming reductions); 'stock' = its decode step under plain "
                        "torch.compile(fullgraph=True), matmuls through BLAS (the A/B of the CPU study)")
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
                        "batch 1; pip install llama-cpp-python)")
    p.add_argument("--quantize", default="none",
                   help="comma list of fmstack weight modes, one system each: none, int8, int4 (default none)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (default 32)")
    p.add_argument("--draft-model", default=None,
                   help="also run speculative decoding (batch 1) with this draft model; compared with plain "
                        "decoding of the same target in the same run")
    p.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="speculative decoding with a quantized copy of the target (or of --draft-model) as draft")
    p.add_argument("--speculate-k", type=int, default=4, help="draft tokens per round (default 4)")
    p.add_argument("--prompt", default="random", choices=["random", "text"],
                   help="prompt tokens: random ids, or a fixed English passage (needs the model's tokenizer; "
                        "what speculative decoding should be measured on)")
    p.add_argument("--parallel", default="none", choices=["none", "tp", "pp"],
                   help="tensor/pipeline parallel fmstack over a torchrun job's ranks (no peers); rank 0 reports")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG (tok/s vs batch size) here; needs matplotlib")


# -- measurement helpers ---------------------------------------------------------------------------

@dataclass
class Run:
    """One timed generation: `steps` decode steps after the prefill, for `batch` rows."""
    ttft_s: float
    decode_s: float
    steps: int
    batch: int


@dataclass
class System:
    name: str
    label: str
    weight_bytes: int
    load_s: float
    vocab_size: int
    # generate(prompts [B, L] int64, new_tokens) -> Run
    generate: Callable[[object, int], Run]
    runs: dict[int, list[Run]] = field(default_factory=dict)
    peak_mem: dict[int, dict[str, float]] = field(default_factory=dict)
    max_batch: int | None = None  # largest batch size it runs (None: any)
    extra: dict = field(default_factory=dict)  # per-system figures for the report (e.g. acceptance)

    def runs_batch(self, batch: int) -> bool:
        return self.max_batch is None or batch <= self.max_batch


class Memory:
    """Peak memory over a region: process peak RSS on CPU (VmHWM, reset through
    /proc/self/clear_refs), peak allocated bytes on CUDA. Both count every loaded system's weights."""

    def __init__(self, device):
        self.device = device

    def current(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_kb("VmRSS") * 1024

    def reset_peak(self) -> bool:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False  # not Linux, or not allowed: the peak is then the process lifetime peak

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        kb = _proc_status_kb("VmHWM")
        if kb:
            return kb * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def compile_counts() -> dict[str, int]:
    """What torch.compile has done so far in this process (torch._dynamo's counters): graphs compiled
    (one per compile or recompile), frames compiled, graph breaks, and Inductor's CUDA-graph skips.
    The difference of two readings counts a region; all zero without compilation."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "frames": int(counters["frames"]["ok"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def compile_counts_since(before: dict[str, int]) -> dict[str, int]:
    now = compile_counts()
    return {k: now[k] - before[k] for k in now}


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({os.cpu_count()} logical CPUs, ATen {cap})"


# -- systems ---------------------------------------------------------------------------------------

def fmstack_system(args, device, dtype, quantize: str | None = None) -> System:
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.loading import load_model, param_bytes

    loaded = load_model(args.model, device=device, dtype=dtype, parallel=getattr(args, "parallel", "none"),
                        quantize=quantize, group_size=args.group_size)
    kwargs = {}
    accepts_compile = "compile" in inspect.signature(Generator.__init__).parameters
    if accepts_compile:
        kwargs["compile"] = args.compile
    elif args.compile:
        log.warning("this Generator has no compile option: fmstack runs eager")
    gen = Generator(loaded.model, None, eos_ids=[], **kwargs)
    compiled = args.compile and accepts_compile
    label = "fmstack (compiled)" if compiled else "fmstack (eager)"
    if compiled and args.decode_compiler == "stock":
        import torch

        mode = "reduce-overhead" if device.type == "cuda" else None
        gen._decode_step = torch.compile(gen._decode_impl, fullgraph=True, mode=mode)
        label = "fmstack (compiled, stock Inductor decode)"

    def generate(prompts, new_tokens: int) -> Run:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        _sync(device)
        res = gen.generate(prompts.tolist(), params)
        _sync(device)
        assert all(len(r.token_ids) == new_tokens for r in res)
        return Run(res[0].prefill_s, res[0].decode_s, new_tokens - 1, len(res))

    name = "fmstack" if quantize is None else f"fmstack-{quantize}"
    if quantize is not None:
        label += f" {quantize}" + (f" g{args.group_size}" if quantize == "int4" else "")
    system = System(name, label, param_bytes(loaded.model), loaded.load_s, loaded.config.vocab_size, generate)
    system.extra["generator"] = gen
    system.extra["tokenizer"] = loaded.tokenizer
    return system


def speculative_system(args, device, dtype, target: System) -> System:
    """Speculative decoding (batch 1) of the plain fmstack target with --draft-model/--draft-quantize."""
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.generation.speculative import SpeculativeGenerator
    from fmstack.loading import load_model, param_bytes

    draft = load_model(args.draft_model or args.model, device=device, dtype=dtype, quantize=args.draft_quantize,
                       group_size=args.group_size)
    tgt_gen = target.extra["generator"]
    dgen = Generator(draft.model, None, eos_ids=[], compile=args.compile)
    tgt_gen.tokenizer, dgen.tokenizer = target.extra["tokenizer"], draft.tokenizer  # for the tokenizer check
    spec = SpeculativeGenerator(tgt_gen, dgen, args.speculate_k)
    tgt_gen.tokenizer = dgen.tokenizer = None  # no detokenization in the timed loop
    counts = {"proposed": 0, "accepted": 0, "rounds": 0}

    def generate(prompts, new_tokens: int) -> Run:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        _sync(device)
        res = spec.generate(prompts[0].tolist(), params)
        _sync(device)
        assert len(res.token_ids) == new_tokens
        for k in counts:
            counts[k] += getattr(res, k)
        return Run(res.prefill_s, res.decode_s, new_tokens - 1, 1)

    draft_name = (args.draft_model or "target") + (f" {args.draft_quantize}" if args.draft_quantize else "")
    system = System("fmstack-spec", f"fmstack speculative, k={args.speculate_k}, draft {draft_name}",
                    param_bytes(draft.model), draft.load_s, target.vocab_size, generate, max_batch=1)
    system.extra["counts"] = counts
    return system


def llamacpp_system(args, device) -> System | None:
    """llama-cpp-python on the same GGUF (batch 1, greedy, args.threads threads)."""
    from fmstack.errors import FmstackError

    if device.type != "cpu":
        raise FmstackError("--peers llamacpp runs on the CPU only here: use --device cpu")
    try:
        import llama_cpp
    except ImportError:
        raise FmstackError("--peers llamacpp needs llama-cpp-python: pip install llama-cpp-python "
                           "(builds llama.cpp from source, several minutes)") from None
    src = hf_source(args.model)
    if src is None or "gguf_file" not in src[1]:
        log.warning("--peers llamacpp: %s is not a GGUF file; no llama.cpp peer", args.model)
        return None
    path = str(Path(src[0]) / src[1]["gguf_file"])
    import torch

    threads = args.threads or torch.get_num_threads()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=args.prompt_len + args.new_tokens + 16, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0

    def generate(prompts, new_tokens: int) -> Run:
        tokens = prompts[0].tolist()
        llm.reset()
        t0 = time.perf_counter()
        t1, n = None, 0
        for _tok in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            n += 1
            if t1 is None:
                t1 = time.perf_counter()
            if n == new_tokens:
                break
        t2 = time.perf_counter()
        return Run(t1 - t0, t2 - t1, new_tokens - 1, 1)

    size = Path(path).stat().st_size
    return System("llama.cpp", f"llama-cpp-python {llama_cpp.__version__} ({Path(path).name})", size, load_s,
                  llm.n_vocab(), generate, max_batch=1)


TEXT_PROMPT = (
    "The history of the lighthouse begins in the ancient world, where fires burned on hilltops to guide "
    "ships home at night. The most famous of these early towers stood on the island of Pharos, near the "
    "harbour of Alexandria, and for centuries it was counted among the wonders of the world. Later builders "
    "in Europe raised stone towers along dangerous coasts, and keepers climbed the stairs every evening to "
    "trim the wicks and polish the lenses. "
)


def prompt_tokens(kind: str, tokenizer, batch: int, length: int, vocab: int, generator):
    """`[batch, length]` int64 prompt ids: random ids, or TEXT_PROMPT's tokens repeated (needs a tokenizer)."""
    import torch

    from fmstack.errors import ParameterError

    if kind == "random":
        return torch.randint(0, vocab, (batch, length), generator=generator)
    if tokenizer is None:
        raise ParameterError("--prompt text needs a model with a tokenizer (random: models have none)")
    ids = tokenizer.encode(TEXT_PROMPT, add_bos=False)
    ids = (ids * (length // len(ids) + 1))[:length]
    return torch.tensor([ids] * batch)


def hf_source(model_spec: str) -> tuple[str, dict] | None:
    """(from_pretrained path, kwargs) for a GGUF file or HF directory; None for other specs."""
    if model_spec.startswith("random:"):
        return None
    from fmstack.checkpoints.named import resolve_model_path

    path = resolve_model_path(model_spec)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and (path / "config.json").is_file():
        return str(path), {}
    return None


def load_hf(args, device, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.model.startswith("random:"):
        return hf_random_model(args.model, device, dtype)
    src = hf_source(args.model)
    if src is None:
        return None
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src[0], dtype=dtype, **src[1]).to(device).eval()
    model.requires_grad_(False)
    return model, time.perf_counter() - t0


def hf_llama_config(config):
    """A transformers LlamaConfig of the same shape as an fmstack ModelConfig."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
              num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
              num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
              rope_theta=config.rope_theta, max_position_embeddings=config.max_seq_len,
              tie_word_embeddings=config.tie_embeddings)
    s = config.rope_scaling
    if s is not None:
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position}
    return LlamaConfig(**kw)


def hf_random_model(model_spec: str, device, dtype):
    """(LlamaForCausalLM, build seconds) shaped like `random:<config>`, with HF's own random init, built on
    `device` in `dtype` (not fmstack's weights: for speed comparisons only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fmstack.config import named_config

    config = hf_llama_config(named_config(model_spec.split(":", 1)[1]))
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, time.perf_counter() - t0


def hf_eager_system(model, load_s: float, device) -> System:
    import torch

    @torch.inference_mode()
    def generate(prompts, new_tokens: int) -> Run:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1)
        tok.tolist()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok[:, None], past_key_values=past, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            tok.tolist()
        t2 = time.perf_counter()
        return Run(t1 - t0, t2 - t1, new_tokens - 1, prompts.shape[0])

    weights = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    return System("hf-eager", "HF transformers eager (DynamicCache)", weights, load_s,
                  model.config.vocab_size, generate)


def hf_static_compile_system(model, load_s: float, device, max_len: int) -> System:
    import torch
    from transformers import StaticCache

    caches: dict[int, object] = {}
    # One compiled forward for all batch sizes (dynamic=False: one graph per batch size, like fmstack).
    decode = torch.compile(model.forward, fullgraph=True, dynamic=False)

    @torch.inference_mode()
    def generate(prompts, new_tokens: int) -> Run:
        B, L = prompts.shape
        cache = caches.get(B)
        if cache is None:
            cache = caches[B] = StaticCache(config=model.config, max_cache_len=max_len)
        else:
            cache.reset()
        _sync(device)
        t0 = time.perf_counter()
        pos = torch.arange(L, device=device)
        out = model(input_ids=prompts, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        tok.tolist()
        t1 = time.perf_counter()
        for i in range(new_tokens - 1):
            cpos = torch.tensor([L + i], device=device)
            out = decode(input_ids=tok[:, None], past_key_values=cache, cache_position=cpos,
                         position_ids=cpos.expand(B, 1), use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            tok.tolist()
        t2 = time.perf_counter()
        return Run(t1 - t0, t2 - t1, new_tokens - 1, B)

    weights = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    return System("hf-static", "HF transformers StaticCache + torch.compile", weights, load_s,
                  model.config.vocab_size, generate)


# -- the benchmark ---------------------------------------------------------------------------------

def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 6) for v in values]}


def run(args: argparse.Namespace) -> dict | None:
    """Run the benchmark `args` describe, write `--out`/`--plot`, and return the report (None on the
    ranks of a torchrun job other than 0)."""
    import torch

    from fmstack.errors import ParameterError
    from fmstack.loading import parse_device, parse_dtype

    try:
        batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError:
        raise ParameterError(f"--batch-sizes {args.batch_sizes!r}: expected a comma list of integers") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise ParameterError("--batch-sizes must list positive integers")
    if args.plot:
        require_matplotlib()
    if args.new_tokens < 2:
        raise ParameterError("--new-tokens must be >= 2 (one prefill token and at least one decode step)")
    if args.prompt_len < 1 or args.repeats < 1:
        raise ParameterError("--prompt-len and --repeats must be >= 1")
    peers = {p.strip() for p in args.peers.split(",") if p.strip()}
    if peers - {"hf", "llamacpp"}:
        raise ParameterError(f"--peers: unknown peer(s) {sorted(peers - {'hf', 'llamacpp'})}; known: hf, llamacpp")
    modes = [m.strip() for m in str(args.quantize).split(",") if m.strip()]
    if not modes or set(modes) - {"none", "int8", "int4"} or len(set(modes)) != len(modes):
        raise ParameterError(f"--quantize {args.quantize!r}: expected a comma list of distinct modes from "
                             "none, int8, int4")
    speculative = args.draft_model is not None or args.draft_quantize is not None
    if speculative and "none" not in modes:
        raise ParameterError("--draft-model/--draft-quantize: the speculative target is the unquantized model; "
                             "include 'none' in --quantize")
    if not 1 <= args.speculate_k <= 16:
        raise ParameterError(f"--speculate-k {args.speculate_k} is invalid: must be in [1, 16]")
    parallel = getattr(args, "parallel", "none")
    if peers and parallel != "none":
        raise ParameterError("--peers cannot be combined with --parallel")
    if args.threads is not None:
        if args.threads < 1:
            raise ParameterError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    compile_start = compile_counts()

    systems = [fmstack_system(args, device, dtype, None if m == "none" else m) for m in modes]
    if speculative:
        systems.append(speculative_system(args, device, dtype, systems[modes.index("none")]))
    if "llamacpp" in peers:
        peer = llamacpp_system(args, device)
        if peer is not None:
            systems.append(peer)
    vocab = None  # the HF model's, when there is one
    max_len = args.prompt_len + args.new_tokens
    if "hf" in peers:
        hf = load_hf(args, device, dtype)
        if hf is None:
            log.warning("--peers hf: %s is not a GGUF file or HF directory; no HF peers", args.model)
        else:
            model, load_s = hf
            vocab = model.config.vocab_size
            systems.append(hf_eager_system(model, load_s, device))
            if args.compile:
                systems.append(hf_static_compile_system(model, load_s, device, max_len))
    gen_vocab = min(vocab or systems[0].vocab_size, systems[0].vocab_size)
    mem = Memory(device)
    g = torch.Generator().manual_seed(args.seed)
    for B in batch_sizes:
        prompts = prompt_tokens(args.prompt, systems[0].extra.get("tokenizer"), B, args.prompt_len, gen_vocab,
                                g).to(device)
        active = [s for s in systems if s.runs_batch(B)]
        for s in active:  # warm-up: compiles this batch size's graphs, faults in the caches
            log.info("warm-up %s batch %d", s.name, B)
            before = compile_counts()
            s.generate(prompts, max(2, min(args.warmup_tokens, args.new_tokens)))
            s.extra.setdefault("compiles", {})[B] = {"warmup": compile_counts_since(before),
                                                     "timed": dict.fromkeys(before, 0)}
        for s in active:
            s.runs[B] = []
        for s in active:
            if "counts" in s.extra:
                s.extra["counts"].update(proposed=0, accepted=0, rounds=0)  # count the timed runs only
        peak = {s.name: 0 for s in active}
        base = {s.name: 0 for s in active}
        for r in range(args.repeats):
            for s in active:
                base_now = mem.current()
                mem.reset_peak()
                before = compile_counts()
                s.runs[B].append(s.generate(prompts, args.new_tokens))
                timed = s.extra["compiles"][B]["timed"]
                for k, v in compile_counts_since(before).items():
                    timed[k] += v
                peak[s.name] = max(peak[s.name], mem.peak())
                base[s.name] = max(base[s.name], base_now)
                run_ = s.runs[B][-1]
                log.info("%s batch %d repeat %d: %.1f tok/s", s.name, B, r, run_.steps * B / run_.decode_s)
        for s in active:
            s.peak_mem[B] = {"peak_mb": peak[s.name] / 2**20, "peak_over_start_mb": (peak[s.name] - base[s.name]) / 2**20}
            timed = s.extra["compiles"][B]["timed"]
            if timed["graphs"] or timed["graph_breaks"]:
                log.warning("%s batch %d: torch.compile compiled %d graph(s) (%d graph break(s)) during the timed "
                            "runs: a recompile inside a generation", s.name, B, timed["graphs"], timed["graph_breaks"])
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None

    report = build_report(args, device, dtype, systems, batch_sizes, load_start, load_end,
                          compile_counts_since(compile_start))
    if parallel != "none":
        import torch.distributed as dist

        report["meta"].update(parallel=parallel, world_size=dist.get_world_size())
        if dist.get_rank() != 0:
            return None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        log.info("wrote %s", args.out)
    if args.plot:
        plot(report, args.plot)
        log.info("wrote %s", args.plot)
    return report


def build_report(args, device, dtype, systems: list[System], batch_sizes, load_start, load_end,
                 compiles: dict[str, int] | None = None) -> dict:
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_avg_start": list(load_start) if load_start else None,
        "load_avg_end": list(load_end) if load_end else None,
        "model": args.model,
        "dtype": args.dtype,
        "compile": args.compile,
        "decode_compiler": args.decode_compiler if args.compile else None,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batch_sizes": batch_sizes,
        "prompt": args.prompt,
        "quantize": args.quantize,
        "group_size": args.group_size,
        "speculative": ({"draft_model": args.draft_model, "draft_quantize": args.draft_quantize,
                         "speculate_k": args.speculate_k}
                        if args.draft_model is not None or args.draft_quantize is not None else None),
        "memory": "process peak RSS (VmHWM)" if device.type == "cpu" else "torch.cuda.max_memory_allocated",
        "command": " ".join(sys.argv),
        # torch.compile over the whole run (loading, warm-ups, timed runs); per row: "compiles"
        "compile_counters": compiles,
    }
    results = []
    for s in systems:
        for B in batch_sizes:
            if B not in s.runs:
                continue
            runs = s.runs[B]
            tok_s = [r.steps * r.batch / r.decode_s for r in runs]
            ms_step = [1e3 * r.decode_s / r.steps for r in runs]
            ttft = [r.ttft_s for r in runs]
            prefill = [r.batch * args.prompt_len / r.ttft_s for r in runs]
            gbs = [s.weight_bytes * (r.steps / r.decode_s) / 1e9 for r in runs]
            results.append({
                "system": s.name, "batch_size": B,
                "decode_tok_s": _stats(tok_s), "ms_per_step": _stats(ms_step),
                "prefill_tok_s": _stats(prefill), "ttft_s": _stats(ttft), "weight_gb_s": _stats(gbs),
                **{k: round(v, 1) for k, v in s.peak_mem[B].items()},
                # graphs compiled in the untimed warm-up (expected: this batch size's) and in the timed
                # runs (expected 0: anything there is a recompile inside a generation)
                "compiles": s.extra.get("compiles", {}).get(B),
            })
    def medians(system: str) -> dict[int, float]:
        return {r["batch_size"]: r["decode_tok_s"]["median"] for r in results if r["system"] == system}

    hf, plain, cpp = medians("hf-eager"), medians("fmstack"), medians("llama.cpp")
    for r in results:
        for key, ref in (("ratio_vs_hf_eager", hf), ("ratio_vs_fmstack", plain), ("ratio_vs_llamacpp", cpp)):
            base = ref.get(r["batch_size"])
            r[key] = round(r["decode_tok_s"]["median"] / base, 3) if base else None
    for s in systems:
        counts = s.extra.get("counts")
        if counts and counts["proposed"]:
            for r in results:
                if r["system"] == s.name:
                    r["acceptance_rate"] = round(counts["accepted"] / counts["proposed"], 4)
                    r["mean_accepted"] = round(counts["accepted"] / counts["rounds"], 4)
    return {
        "meta": meta,
        "systems": {s.name: {"label": s.label, "weight_bytes": s.weight_bytes, "load_s": round(s.load_s, 3)}
                    for s in systems},
        "results": results,
    }


def format_table(report: dict) -> str:
    """The report as a text table: one line per system and batch size (what `fmstack bench` prints)."""
    m = report["meta"]
    load = m["load_avg_start"]
    lines = [f"# {m['model']} {m['dtype']} on {m['device_name']}, {m['threads']} threads, torch {m['torch']}, "
             f"prompt {m['prompt_len']}, {m['new_tokens']} new tokens, {m['repeats']} repeats"
             + (f", load avg {load[0]:.2f} -> {m['load_avg_end'][0]:.2f}" if load else "")]
    header = (f"{'system':<13} {'batch':>5} {'tok/s median [min-max]':>26} {'ms/step':>8} {'prefill tok/s':>13} "
              f"{'TTFT ms':>8} {'GB/s':>6} {'peak MB':>8} {'vs HF eager':>11} {'vs fmstack':>10} "
              f"{'vs llama.cpp':>12}")
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        t = r["decode_tok_s"]
        spread = f"{t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}]"
        ratios = [f"{r[k]:.2f}x" if r.get(k) else "-" for k in ("ratio_vs_hf_eager", "ratio_vs_fmstack",
                                                                 "ratio_vs_llamacpp")]
        lines.append(f"{r['system']:<13} {r['batch_size']:>5} {spread:>26} {r['ms_per_step']['median']:>8.2f} "
                     f"{r['prefill_tok_s']['median']:>13.1f} {1e3 * r['ttft_s']['median']:>8.1f} "
                     f"{r['weight_gb_s']['median']:>6.1f} {r['peak_mb']:>8.0f} {ratios[0]:>11} {ratios[1]:>10} "
                     f"{ratios[2]:>12}")
        if "acceptance_rate" in r:
            lines.append(f"{'':<13} {'':>5} speculative: acceptance {100 * r['acceptance_rate']:.1f}%, "
                         f"{r['mean_accepted']:.2f} draft tokens accepted per round")
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Fail before a long benchmark, not after it, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from fmstack.errors import FmstackError

        raise FmstackError("--plot needs matplotlib: pip install 'fmstack[bench]'") from None


def plot(report: dict, path: str) -> None:
    """tok/s vs batch size, one line per system, min-max error bars (matplotlib, Agg)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["meta"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, info in report["systems"].items():
        rows = [r for r in report["results"] if r["system"] == name]
        xs = [r["batch_size"] for r in rows]
        med = [r["decode_tok_s"]["median"] for r in rows]
        lo = [r["decode_tok_s"]["median"] - r["decode_tok_s"]["min"] for r in rows]
        hi = [r["decode_tok_s"]["max"] - r["decode_tok_s"]["median"] for r in rows]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=info["label"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(m["batch_sizes"])
    ax.set_xticklabels([str(b) for b in m["batch_sizes"]])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (all rows; median, min-max bars)")
    load = m["load_avg_start"]
    ax.set_title(f"{m['model']} {m['dtype']}, {m['device_name'][:60]}\n{m['threads']} threads, torch {m['torch']}"
                 + (f", load avg {load[0]:.1f}" if load else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)

