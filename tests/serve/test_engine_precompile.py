"""The compiled engine's steps saved whole (`fmstack.backends.precompile`): a second process with the
same model and engine settings loads its decode and flattened steps from the compile cache without
Dynamo tracing them (the warm server start), with the first process's tokens. The step inputs that
change size every step (the paged views' `StepSlots`) keep their dynamic marks through the entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmstack.backends.precompile import precompile_available
from fmstack.generation.compile_cache import cache_entries

pytestmark = pytest.mark.skipif(not precompile_available(), reason="this torch cannot save whole compiled steps")

RUN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from fmstack.backends import compile_counters
from fmstack.generation.sampling import SamplingParams
from fmstack.loading import load_model
from fmstack.serve.engine import Engine, EngineConfig, RequestParams
from tests.serve.test_engine import prompts, run, tokens_of
eng = Engine(load_model("random:tiny-gqa", seed=0).model, None, EngineConfig(
    block_size=4, num_blocks=60, max_num_batched_tokens=24, max_num_seqs=2, max_model_len=64, compile=True))
warmed = eng.warm_up(sys.argv[1])
outs, _ = run(eng, prompts([9, 5, 12], seed=4), RequestParams(SamplingParams(max_new_tokens=6)))
print(json.dumps({"warmed": warmed, "tokens": tokens_of(outs), **compile_counters()}))
"""


def engine_process(root: Path, warmup: str) -> tuple[dict, str]:
    env = {**os.environ, "FMSTACK_CACHE_DIR": str(root), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", RUN, warmup], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_second_engine_process_loads_its_steps_without_tracing(tmp_path):
    cold, cold_log = engine_process(tmp_path, "all")
    # three graphs: the bucket-2 decode step compiled in a background process beside bucket 1's
    assert cold["warmed"] == [1, 2] and cold["graphs"] == 2 and cold["graph_breaks"] == 0
    assert "compiling engine decode step (batch 2) in a background process" in cold_log
    saved = sorted(e["key"]["step"] for e in cache_entries(tmp_path / "compile")
                   if e["key"]["shape"][0] == "precompiled")
    assert saved == ["engine decode step", "engine decode step", "engine step"]
    warm, log = engine_process(tmp_path, "cached")
    assert warm["warmed"] == [1, 2]
    assert warm["graphs"] == 0 and warm["frames"] == 0  # nothing traced: every step loaded
    assert warm["tokens"] == cold["tokens"]
    assert "loaded compiled engine decode step (batch 2)" in log and "loaded compiled engine step" in log
