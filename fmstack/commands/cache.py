"""`fmstack cache info|clear`: what fmstack's compile cache holds (`<cache dir>/compile`, one bundle
per compiled step: `fmstack.generation.compile_cache`, and Inductor's directory `<cache dir>/inductor`
with the built kernels) and emptying it."""

from __future__ import annotations

import argparse
import json

from fmstack.generation.compile_cache import cache_entries, clear_cache, compile_cache_dir, kernel_cache_dir

HELP = "show (info) or empty (clear) the compile cache of compiled generation steps"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["info", "clear"], help="info: list the entries; clear: delete them all")
    p.add_argument("--json", action="store_true", help="info: print one JSON object")


def describe(entry: dict) -> str:
    """One line per bundle: which model (name/shape), dtype, quantization, step, size."""
    key = entry["key"]
    size = f"{entry['bytes'] / 2**20:.1f} MiB"
    if key is None:
        return f"{entry['path']}  {size}  (no key file)"
    cfg = key.get("config") or {}
    model = ", ".join(f"{k} {cfg[k]}" for k in ("n_layers", "dim", "vocab_size") if isinstance(cfg, dict) and k in cfg)
    quant = (key.get("quant") or {}).get("mode", "none")
    return (f"{entry['path']}  {size}  {key.get('step')} ({', '.join(key.get('shape', []))}); model: {model}; "
            f"{key.get('dtype')}, quant {quant}; torch {key.get('torch')}, {key.get('isa')}")


def run(args: argparse.Namespace) -> int:
    root = compile_cache_dir()
    if args.action == "clear":
        print(f"cleared {root} and fmstack's Inductor directory {kernel_cache_dir()} (unless $TORCHINDUCTOR_CACHE_DIR "
              f"names another): {clear_cache() / 2**20:.1f} MiB freed")
        return 0
    entries = cache_entries(root)
    if args.json:
        print(json.dumps({"path": str(root), "entries": entries}))
        return 0
    total = sum(e["bytes"] for e in entries)
    print(f"compile cache {root}: {len(entries)} entries, {total / 2**20:.1f} MiB; "
          f"Inductor's kernels and graphs: {kernel_cache_dir()}")
    for e in entries:
        print("  " + describe(e))
    return 0
