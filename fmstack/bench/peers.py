"""The peer systems `fmstack bench --peers` measures in the same process as fmstack, on the same model,
prompts and threads:

  hf-eager    HF transformers `LlamaForCausalLM` built from the same checkpoint, plain argmax loop over
              its DynamicCache (prefill with logits_to_keep=1). For random:<config> models, an HF model
              of the same shape with HF's own random weights, built on the device (speed only).
  hf-static   (with --compile) HF `StaticCache`, eager prefill, decode through
              `torch.compile(model.forward, fullgraph=True)`, i.e. what `generate(...,
              cache_implementation="static")` does on GPUs (on CPU, HF does not auto-compile).
  llama.cpp   llama-cpp-python on the same GGUF file, batch 1, greedy.

Both HF loops copy the new token ids to the host every step, as fmstack's does (a streaming server must).
transformers and llama_cpp are optional: imported where they are used.
"""

from __future__ import annotations

import contextlib

import logging
import time
from pathlib import Path

import torch

from fmstack.bench.measure import Run, System, sync, unique_bytes
from fmstack.checkpoints.named import resolve_model_path
from fmstack.config import named_config
from fmstack.errors import FmstackError

log = logging.getLogger(__name__)


def llamacpp_system(args, device) -> System | None:
    """llama-cpp-python on the same GGUF (batch 1, greedy, args.threads threads)."""
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
    threads = args.threads or torch.get_num_threads()
    t0 = time.perf_counter()
    with _no_extra_buffer_types(llama_cpp):
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


def hf_source(model_spec: str) -> tuple[str, dict] | None:
    """(from_pretrained path, kwargs) for a GGUF file or HF directory; None for other specs."""
    if model_spec.startswith("random:"):
        return None
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
    from transformers import AutoModelForCausalLM

    config = hf_llama_config(named_config(model_spec.split(":", 1)[1]))
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, time.perf_counter() - t0


def hf_eager_system(model, load_s: float, device) -> System:
    @torch.inference_mode()
    def generate(prompts, new_tokens: int) -> Run:
        sync(device)
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

    weights = unique_bytes(list(model.parameters()) + list(model.buffers()))
    return System("hf-eager", "HF transformers eager (DynamicCache)", weights, load_s,
                  model.config.vocab_size, generate)


def hf_static_compile_system(model, load_s: float, device, max_len: int) -> System:
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
        sync(device)
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

    weights = unique_bytes(list(model.parameters()) + list(model.buffers()))
    return System("hf-static", "HF transformers StaticCache + torch.compile", weights, load_s,
                  model.config.vocab_size, generate)


@contextlib.contextmanager
def _no_extra_buffer_types(llama_cpp):
    """llama.cpp's model params with `use_extra_bufts` off while a model loads: on an AMX CPU under a
    hypervisor that does not grant the AMX tile state (the Sapphire Rapids VM of 2026-12-02), its AMX
    repack of the weights dies with SIGILL at the first matmul. Off, it runs its AVX-512 VNNI kernels,
    as on a CPU without AMX. `Llama()` takes no such argument, so its default-params call is wrapped."""
    module = getattr(llama_cpp, "llama", None)
    lib = getattr(module, "llama_cpp", None)
    default = getattr(lib, "llama_model_default_params", None)
    if default is None or not any(f[0] == "use_extra_bufts" for f in lib.llama_model_params._fields_):
        yield
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default
