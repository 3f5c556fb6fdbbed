"""One decode row per model family on CPU: fmstack (compiled, eager where compiling fails) vs HF
transformers eager on the same random weights, batch 1, in the same run.

Each family's named config keeps its real per-layer shape (width, heads, head_dim, FFN, vocab and
the family's own fields: Qwen2 q/k/v bias, Qwen3 q/k norms, Granite multipliers, Mistral's window)
with fewer layers, so a row runs in tens of seconds on a shared 2-core machine. Mixtral-8x7B
(46.7B parameters) does not fit even at one layer in a few GB of fp32, so its row is the 8-expert
top-2 layout scaled down in width (dim 1024, ffn 3584, 8 q / 2 kv heads of 128: the layer of
`fmstack.models.moe`'s measurement). The HF model is built with HF's own random init,
`save_pretrained` to a temporary directory and loaded from there by fmstack's HF reader
(so both run the same weights); greedy tokens of the two are compared too (random weights give
flat logits, so a near tie may flip a token: recorded, not asserted).

    python benchmarks/families.py --out benchmarks/results/families_cpu.json

Figures on a loaded shared machine are upper bounds; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fmstack.config import ModelConfig, named_config

log = logging.getLogger("families")

# family -> (HF config class, HF model class, named config, overrides of the named config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "smollm2-135m", {"n_layers": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2.5-0.5b", {"n_layers": 4}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3-0.6b", {"n_layers": 4}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", "granite-3.1-2b", {"n_layers": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "mistral-7b", {"n_layers": 1}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "mixtral-8x7b",
                {"n_layers": 2, "dim": 1024, "ffn_dim": 3584, "n_heads": 8, "n_kv_heads": 2, "head_dim": 128}),
}


def hf_config(family: str, c: ModelConfig):
    """The HF config of `family` with the shape and family fields of fmstack config `c`."""
    import transformers

    kw = dict(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
              num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
              rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
              tie_word_embeddings=c.tie_embeddings)
    if family == "granite":
        kw.update(embedding_multiplier=c.embedding_multiplier, residual_multiplier=c.residual_multiplier,
                  attention_multiplier=c.attention_multiplier, logits_scaling=c.logits_scaling)
    if family == "mistral":
        kw.update(sliding_window=c.sliding_window)
    if family == "mixtral":
        kw.update(num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_per_token)
    return getattr(transformers, FAMILIES[family][0])(**kw)


def timed_decode(generate, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """A warm-up call (compiles), then `repeats` timed calls: median decode tok/s and the tokens."""
    t0 = time.perf_counter()
    generate(prompt, 4)
    warm_s = time.perf_counter() - t0
    runs = [generate(prompt, new_tokens) for _ in range(repeats)]
    rates = [(new_tokens - 1) / decode_s for _, decode_s in runs]
    return {"decode_tok_s": round(statistics.median(rates), 2), "runs_tok_s": [round(r, 2) for r in rates],
            "warmup_s": round(warm_s, 2), "tokens": runs[0][0]}


def fmstack_generate(model, compile: bool):
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams

    gen = Generator(model, None, eos_ids=[], compile=compile, max_seq_len=256)

    def generate(prompt: list[int], n: int) -> tuple[list[int], float]:
        res = gen.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
        return res.token_ids, res.decode_s

    return generate


def hf_generate(model):
    """HF eager greedy decode with its DynamicCache (as `fmstack.bench.peers.hf_eager_system`)."""

    @torch.inference_mode()
    def generate(prompt: list[int], n: int) -> tuple[list[int], float]:
        out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
        ids = [int(tok)]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=tok[:, None], past_key_values=past, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            ids.append(int(tok))
        return ids, time.perf_counter() - t0

    return generate


def family_row(family: str, args) -> dict:
    import transformers

    from fmstack.checkpoints import open_checkpoint
    from fmstack.checkpoints.base import load_weights
    from fmstack.models.build import build_model

    _, model_cls, name, overrides = FAMILIES[family]
    cfg = named_config(name).replace(name=f"{name}-{overrides['n_layers']}l", **overrides)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hf = getattr(transformers, model_cls)(hf_config(family, cfg)).float().eval()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        hf.save_pretrained(tmp)
        ckpt = open_checkpoint(Path(tmp))  # the config converter and name maps, as `load_model` (no tokenizer)
        ours = build_model(ckpt.config)
        load_weights(ours, ckpt)
        ours.eval()
    setup_s = time.perf_counter() - t0
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    row = {"family": family, "config": cfg.name, "from": name, "overrides": overrides,
           "params": sum(p.numel() for p in ours.parameters()), "setup_s": round(setup_s, 1)}
    try:
        row["fmstack"] = {"mode": "compiled", **timed_decode(fmstack_generate(ours, True), prompt, args.new_tokens,
                                                              args.repeats)}
    except Exception as e:  # noqa: BLE001 - a family that does not compile is measured eager
        log.warning("%s: compiled decode failed (%s); measuring eager", family, e)
        row["fmstack"] = {"mode": "eager", "compile_error": f"{type(e).__name__}: {e}"[:300],
                          **timed_decode(fmstack_generate(ours, False), prompt, args.new_tokens, args.repeats)}
    row["hf_eager"] = timed_decode(hf_generate(hf), prompt, args.new_tokens, args.repeats)
    row["ratio"] = round(row["fmstack"]["decode_tok_s"] / row["hf_eager"]["decode_tok_s"], 2)
    row["tokens_equal"] = row["fmstack"].pop("tokens") == row["hf_eager"].pop("tokens")
    log.info("%s: fmstack %s %.1f tok/s, HF eager %.1f tok/s (x%.2f), tokens equal: %s", family,
             row["fmstack"]["mode"], row["fmstack"]["decode_tok_s"], row["hf_eager"]["decode_tok_s"], row["ratio"],
             row["tokens_equal"])
    del hf, ours
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/families.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tmp", default=None, help="directory for the temporary save_pretrained copies")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/families_cpu.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    rows = [family_row(f, args) for f in args.families]
    report = {"benchmark": "families", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": 1, "dtype": "fp32",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({r["family"]: r["ratio"] for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
