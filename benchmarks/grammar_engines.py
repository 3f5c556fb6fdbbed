"""xgrammar vs llguidance on the default model's vocabulary (SmolLM2, 49152 tokens), CPU.

Measures, per engine: the tokenizer set-up, the time to compile one JSON-schema grammar, and the
per-token time to fill the allowed-token bitmask for a batch of 1 and of 16 matchers (each matcher
then advanced by one token of a valid JSON document, so the masks are computed at varied grammar
states). Result JSON: benchmarks/results/grammar_engines_cpu.json.

    python -m benchmarks.grammar_engines
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}}, "required": ["name", "age", "tags", "address"]}
DOC = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "address": {"city": "London", "zip": "W1"}}'


def _ms(f, reps: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) * 1000 / reps


def bench_xgrammar(tok, vocab: int, doc_ids: list[int]) -> dict:
    import xgrammar as xgr

    tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    t = time.perf_counter()
    info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=sorted(tok.eos_ids))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = (time.perf_counter() - t) * 1000
    schema = json.dumps(SCHEMA)
    compile_ms = statistics.median(_ms(lambda: compiler.compile_json_schema(schema)) for _ in range(3))
    grammar = compiler.compile_json_schema(schema)
    out = {"version": xgr.__version__ if hasattr(xgr, "__version__") else "?", "setup_ms": setup,
           "compile_json_schema_ms": compile_ms}
    for batch in (1, 16):
        out[f"mask_ms_per_token_b{batch}"] = _mask_loop(
            [xgr.GrammarMatcher(grammar) for _ in range(batch)], xgr.allocate_token_bitmask(batch, vocab), vocab,
            doc_ids, lambda m, mask, i: m.fill_next_token_bitmask(mask, i), xgr.apply_token_bitmask_inplace,
            lambda m, tid: m.accept_token(tid))
    return out


def _mask_loop(matchers, mask, vocab, doc_ids, fill, apply, consume) -> float:
    """Median ms per token to fill every matcher's mask row and apply the masks, along a valid document."""
    logits = torch.randn(len(matchers), vocab)
    per_tok = []
    for tid in doc_ids:
        t = time.perf_counter()
        for i, m in enumerate(matchers):
            fill(m, mask, i)
        apply(logits, mask)
        per_tok.append((time.perf_counter() - t) * 1000)
        for m in matchers:
            assert consume(m, tid)
    return statistics.median(per_tok)


def bench_llguidance(tok, vocab: int, doc_ids: list[int]) -> dict:
    import llguidance
    import llguidance.torch as llt

    from fmstack.generation.structured import grammar_tokenizer

    t = time.perf_counter()
    lltok = grammar_tokenizer(tok)
    setup = (time.perf_counter() - t) * 1000
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compile_ms = statistics.median(_ms(lambda: llguidance.LLMatcher(lltok, grammar)) for _ in range(3))
    out = {"version": llguidance.get_version() if hasattr(llguidance, "get_version") else "?", "setup_ms": setup,
           "compile_json_schema_ms": compile_ms}
    for batch in (1, 16):
        out[f"mask_ms_per_token_b{batch}"] = _mask_loop(
            [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)], llt.allocate_token_bitmask(batch, vocab),
            vocab, doc_ids, lambda m, mask, i: llt.fill_next_token_bitmask(m, mask, i), llt.apply_token_bitmask_inplace,
            lambda m, tid: m.consume_token(tid))
    return out


def main() -> None:
    from fmstack.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m-instruct")
    tok, vocab = loaded.tokenizer, loaded.model.config.vocab_size
    doc_ids = tok.encode(DOC, add_bos=False)
    res = {"vocab": vocab, "doc_tokens": len(doc_ids), "threads": 1}
    for name, f in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        try:
            res[name] = f(tok, vocab, doc_ids)
        except Exception as e:  # noqa: BLE001 - record an engine that will not run here
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, res[name], flush=True)
    path = Path(__file__).parent / "results" / "grammar_engines_cpu.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
