"""`fmstack bench --whole-command`: what a user waits for. Each system runs as a fresh process, from
process start to exit, loading included: `fmstack generate --max-new-tokens N PROMPT` exactly as a user
types it (its defaults, whatever they are when it runs, plus --generate-args), cold (empty fmstack and
Inductor caches: new temporary $FMSTACK_CACHE_DIR and $TORCHINDUCTOR_CACHE_DIR) and warm (a second
process on the same caches); beside it, a script doing the same with HF transformers (eager) and with
llama-cpp-python on the same GGUF (`peer_command.py`), same prompt, token count and threads.

Per run: wall time (the parent's clock before the process starts to its exit), time to first token
(process start to the moment the child's first token was ready: each child appends one JSON line to
an events file with that wall-clock time, `fmstack generate` when $FMSTACK_BENCH_EVENTS names the
file), the child's own load time, prefill time, decode tok/s and token count. Each repeat runs fmstack
cold, fmstack warm, then the peers, so machine load drifts hit all of them alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fmstack.bench.report import build_whole_report
from fmstack.checkpoints.named import cache_dir, resolve_model_path
from fmstack.errors import FmstackError, ParameterError
from fmstack.generation.compile import compile_by_default

log = logging.getLogger("fmstack.bench")

EVENTS_ENV = "FMSTACK_BENCH_EVENTS"
PEERS = ("hf", "llamacpp")
PEER_SCRIPT = Path(__file__).with_name("peer_command.py")
DEFAULT_PROMPT = "The history of the lighthouse begins in the ancient world, where"
CHILD_TIMEOUT_S = 3600


def check_whole_args(args: argparse.Namespace) -> list[str]:
    """The peers to run; ParameterError for options this mode does not take (fmstack's own flags go
    through --generate-args, so that the bench measures `fmstack generate`'s defaults)."""
    if args.model.startswith("random:"):
        raise ParameterError(f"--whole-command: --model {args.model} has no tokenizer, so `fmstack generate` "
                             "cannot take its text prompt; use a checkpoint or registry name")
    if args.new_tokens < 2:
        raise ParameterError("--new-tokens must be >= 2 (one prefill token and at least one decode step)")
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        raise ParameterError("--repeats and --threads must be >= 1")
    given = [opt for opt, bad in (("--quantize", args.quantize != "none"), ("--dtype", args.dtype != "fp32"),
                                  ("--device", args.device != "cpu"), ("--parallel", args.parallel != "none"),
                                  ("--draft-model/--draft-quantize", args.draft_model or args.draft_quantize),
                                  ("--batch-sizes", args.batch_sizes != "1,2,4,8,16"),
                                  ("--no-compile", args.compile is False and compile_by_default())) if bad]
    if args.plot:
        raise ParameterError("--plot is not available with --whole-command (it prints a markdown table)")
    if given:
        raise ParameterError(f"--whole-command runs `fmstack generate` with its own defaults: pass {', '.join(given)} "
                             "to it through --generate-args '...' (batch 1, CPU, fp32 peers)")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ParameterError(f"--peers: unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    return peers


def model_arg(spec: str) -> tuple[str, Path]:
    """(--model for the fmstack child, checkpoint file or directory for the peers). A model fetched into
    fmstack's cache is passed by path, since the child's cache directory starts empty."""
    path = resolve_model_path(spec).resolve()
    under_cache = cache_dir().resolve() in path.parents
    return (str(path) if under_cache else spec), path


def fmstack_command(args: argparse.Namespace, model: str, prompt: str) -> list[str]:
    return [sys.executable, "-m", "fmstack", "generate", "--model", model, "--max-new-tokens", str(args.new_tokens),
            *shlex.split(args.generate_args or ""), prompt]


def peer_command(system: str, args: argparse.Namespace, path: Path, prompt: str, threads: int, events: Path):
    cmd = [sys.executable, str(PEER_SCRIPT), system, prompt, "--model", str(path), "--max-new-tokens",
           str(args.new_tokens), "--threads", str(threads), "--events", str(events)]
    return cmd + (["--ignore-eos"] if "--ignore-eos" in (args.generate_args or "") else [])


def run_child(cmd: list[str], env: dict[str, str], events: Path) -> dict:
    """Run one command to its exit; its events line plus wall_s and ttft_s from the process start."""
    events.unlink(missing_ok=True)
    t_start = time.time()
    proc = subprocess.run(cmd, env={**env, EVENTS_ENV: str(events)}, check=False, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    t_exit = time.time()
    if proc.returncode != 0:
        raise FmstackError(f"--whole-command: `{' '.join(cmd[:5])} ...` exited with status {proc.returncode}: "
                           f"{proc.stderr.strip()[-1500:]}")
    if not events.is_file():
        raise FmstackError(f"--whole-command: `{' '.join(cmd[:5])} ...` wrote no timing line to ${EVENTS_ENV}")
    rec = json.loads(events.read_text().strip().splitlines()[-1])
    rec.update(wall_s=t_exit - t_start, ttft_s=rec["first_token_time"] - t_start,
               decode_tok_s=(rec["tokens"] - 1) / rec["decode_s"] if rec["tokens"] > 1 and rec["decode_s"] > 0
               else None)
    return rec


def run_whole(args: argparse.Namespace) -> dict:
    """Every repeat: fmstack cold and warm (fresh caches per repeat), then each peer; the report."""
    peers = check_whole_args(args)
    threads = args.threads or torch.get_num_threads()
    model, path = model_arg(args.model)
    if "llamacpp" in peers and path.suffix != ".gguf":
        raise ParameterError(f"--peers llamacpp: {args.model} is not a GGUF file ({path})")
    prompt = args.text or DEFAULT_PROMPT
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    runs: dict[tuple[str, str], list[dict]] = {}
    load_start = os.getloadavg()
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fmstack-wait-") as tmp:
            tmp = Path(tmp)
            cenv = {**env, "FMSTACK_CACHE_DIR": str(tmp / "fmstack"), "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}
            plan = [("fmstack", "cold", fmstack_command(args, model, prompt)),
                    ("fmstack", "warm", fmstack_command(args, model, prompt))]
            plan += [(p, "-", peer_command(p, args, path, prompt, threads, tmp / "events.jsonl")) for p in peers]
            for system, phase, cmd in plan:
                rec = run_child(cmd, cenv, tmp / "events.jsonl")
                rec["command"] = cmd
                runs.setdefault((system, phase), []).append(rec)
                _log_run(rep, system, phase, rec)
    return build_whole_report(args, threads, prompt, runs, (load_start, os.getloadavg()))


def _log_run(rep: int, system: str, phase: str, rec: dict) -> None:
    log.info(
        "repeat %d %s %s: %.2fs wall, first token at %.2fs, load %.2fs, %d tokens", rep, system, phase,
        rec["wall_s"], rec["ttft_s"], rec["load_s"], rec["tokens"])
