"""The peers of `fmstack bench --whole-command`: a user's script generating from a prompt with HF
transformers (eager) or llama-cpp-python, run as a fresh process, as `fmstack generate` is.

Run by path (`python fmstack/bench/peer_command.py hf|llamacpp ...`), so the process imports neither
fmstack nor anything the script does not use: what it costs is what a user of that library waits for.
Both decode greedily with a plain loop, token by token (HF: DynamicCache, logits of the last position
only, argmax; llama.cpp: its own sampler at top_k=1), stop at the end-of-sequence token unless
--ignore-eos and detokenize the text (`run` returns it; the parent reads only the events line, so
nothing is printed). One JSON line goes to --events: the wall-clock time the
first token was ready (`time.time()`, the clock the parent stamped the process start with), load,
prefill and decode seconds, tokens generated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def hf_generate(args: argparse.Namespace) -> dict:
    """HF transformers, eager, fp32: the GGUF (or HF directory) through `from_pretrained`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _hf_run(args)
    finally:
        torch.set_num_threads(threads)  # called in-process (a test), the caller keeps its thread count


def _hf_run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model)
    src, kw = (str(path.parent), {"gguf_file": path.name}) if path.suffix == ".gguf" else (str(path), {})
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - t0
    ids = tok(args.prompt, return_tensors="pt").input_ids
    eos = set() if args.ignore_eos or tok.eos_token_id is None else {tok.eos_token_id}
    out: list[int] = []
    with torch.inference_mode():
        t1 = time.perf_counter()
        res = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = int(res.logits[0, -1].argmax())
        first, t2 = time.time(), time.perf_counter()
        out.append(nxt)
        while len(out) < args.max_new_tokens and nxt not in eos:
            res = model(input_ids=torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
        t3 = time.perf_counter()
    return {"text": tok.decode(out, skip_special_tokens=True), "first_token_time": first, "load_s": load_s,
            "prefill_s": t2 - t1, "decode_s": t3 - t2,
            "tokens": len(out), "prompt_tokens": ids.shape[1], "label": "HF transformers eager fp32"}


def llamacpp_generate(args: argparse.Namespace) -> dict:
    """llama-cpp-python on the GGUF as it is (its own quantized kernels)."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def params():  # extra buffer types (AMX repack) off, as fmstack/bench/peers.py says why
        p = default()
        p.use_extra_bufts = False
        return p
    if any(f[0] == "use_extra_bufts" for f in llama_cpp.llama_model_params._fields_):
        llama_module.llama_cpp.llama_model_default_params = params
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads,
                          n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True, special=False)
    eos = None if args.ignore_eos else llm.token_eos()
    out: list[int] = []
    t1 = time.perf_counter()
    first = t2 = None
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if first is None:
            first, t2 = time.time(), time.perf_counter()
        out.append(tok)
        if tok == eos or len(out) == args.max_new_tokens:
            break
    t3 = time.perf_counter()
    return {"text": llm.detokenize([t for t in out if t != eos]).decode("utf-8", errors="replace"),
            "first_token_time": first, "load_s": load_s, "prefill_s": t2 - t1, "decode_s": t3 - t2,
            "tokens": len(out), "prompt_tokens": len(ids), "label": f"llama-cpp-python {llama_cpp.__version__}"}


def run(argv: list[str] | None = None) -> dict:
    """Parse `argv`, generate with the peer, append its JSON line to --events and return the record
    (with the generated text under "text"); the script's entry point writes the text to stdout."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("system", choices=["hf", "llamacpp"])
    p.add_argument("prompt")
    p.add_argument("--model", required=True, help="GGUF file (or, for hf, an HF model directory)")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--events", required=True, help="file the JSON line is appended to")
    args = p.parse_args(argv)
    record = (hf_generate if args.system == "hf" else llamacpp_generate)(args)
    line = {k: v for k, v in record.items() if k != "text"}
    with open(args.events, "a", encoding="utf-8") as f:
        f.write(json.dumps({"system": args.system, "end_time": time.time(), **line}) + "\n")
    return record


if __name__ == "__main__":
    run()
