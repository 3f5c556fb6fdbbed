"""Decode benchmark: fmstack against HF transformers / llama.cpp on the same model, prompt and threads.
`fmstack bench` (fmstack/commands/bench.py) is its command line; this package does the measuring.

Measures, per system and batch size: decode tok/s (all rows), ms per decode step, prefill tok/s,
time to first token, achieved weight bandwidth (weight bytes x decode steps/s; at batch 1 this is
weight bytes x tok/s), peak memory (process RSS on CPU, torch.cuda.max_memory_allocated on CUDA) and
what torch.compile compiled in the warm-up and in the timed runs (`compiles`; the timed runs should
compile nothing).

  measure.py  a timed run, a measured system, peak memory, compile counters, prompts
  systems.py  fmstack's systems: Generator per weight mode, speculative decoding
  peers.py    HF transformers (eager, static cache + compile) and llama-cpp-python
  run.py      checks the settings, loads the systems, warms up and measures them interleaved
  report.py   the JSON report and the text table
  plot.py     the PNG (matplotlib)

    fmstack bench --peers hf --out benchmarks/results/decode_cpu.json --plot benchmarks/results/decode_cpu.png
    fmstack bench --model random:tiny-mha --batch-sizes 1,2 --new-tokens 4 --no-compile
"""
