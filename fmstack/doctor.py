"""What this machine offers fmstack, as facts: torch build, CPU ISA, threads, GPUs, caches, optional
parts, the default model. `fmstack doctor` prints them; a bug report pastes `fmstack doctor --json`.

Collecting must stay cheap and side-effect free: nothing is downloaded, compiled or imported beyond
torch (optional packages are looked up with `importlib.util.find_spec`, not imported).
"""

from __future__ import annotations

import getpass
import importlib.metadata
import importlib.util
import os
import platform
import tempfile
from pathlib import Path

import torch

import fmstack
from fmstack.checkpoints.named import DEFAULT_MODEL, NAMED_MODELS, cache_dir

# optional part -> the import names it needs (pyproject extras)
OPTIONAL_PARTS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn"),
    "eval (lm-eval adapter)": ("lm_eval",),
    "bench --plot": ("matplotlib",),
    "bench --peers hf": ("transformers",),
    "bench --peers llamacpp": ("llama_cpp",),
}
DISTRIBUTIONS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "lm_eval": "lm-eval", "matplotlib": "matplotlib",
                 "transformers": "transformers", "llama_cpp": "llama-cpp-python"}


def inductor_cache_dir() -> Path:
    """Where torch.compile's Inductor keeps its caches: $TORCHINDUCTOR_CACHE_DIR, else torch's default
    <tmp>/torchinductor_<user> (restated here rather than read from torch's private modules)."""
    explicit = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if explicit:
        return Path(explicit)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Path(tempfile.gettempdir()) / f"torchinductor_{user.replace(os.sep, '_')}"


def dir_size(path: Path) -> int | None:
    """Bytes under `path` (files only, links not followed), or None when it does not exist."""
    if not path.is_dir():
        return None
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _version(import_name: str) -> str | None:
    if importlib.util.find_spec(import_name) is None:
        return None
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(import_name, import_name))
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}"})
    return out


def collect() -> dict:
    """The facts, as one JSON-ready dict."""
    caches = {"fmstack": cache_dir(), "inductor": inductor_cache_dir()}
    packages = {name: _version(name) for names in OPTIONAL_PARTS.values() for name in names}
    wheel = NAMED_MODELS[DEFAULT_MODEL]
    default = wheel.find()
    return {
        "fmstack": fmstack.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "build": "cuda" if torch.version.cuda else "cpu",
                  "cuda": torch.version.cuda, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()},
        "cpu_count": os.cpu_count(),
        "gpus": _gpus(),
        "caches": {k: {"path": str(v), "bytes": dir_size(v)} for k, v in caches.items()},
        "packages": packages,
        "optional": {part: all(packages[n] is not None for n in names) for part, names in OPTIONAL_PARTS.items()},
        "default_model": {"name": DEFAULT_MODEL, "path": str(default) if default else None,
                          "present": default is not None, "download_mb": wheel.size_mb},
    }


def _size(n: int | None) -> str:
    if n is None:
        return "absent"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_report(facts: dict) -> str:
    """The facts as aligned lines for a person."""
    t = facts["torch"]
    gpus = ", ".join(f"{g['index']}: {g['name']} ({g['memory_gib']} GiB, sm {g['capability']})"
                     for g in facts["gpus"]) or "none"
    dm = facts["default_model"]
    lines = [
        ("fmstack", facts["fmstack"]),
        ("python", f"{facts['python']} ({facts['platform']})"),
        ("torch", f"{t['version']} ({t['build']} build{', CUDA ' + t['cuda'] if t['cuda'] else ''})"),
        ("cpu ISA (ATen)", t["cpu_capability"]),
        ("threads", f"{t['threads']} intra-op, {t['interop_threads']} inter-op, {facts['cpu_count']} CPUs"),
        ("gpus", gpus),
        *((f"cache {k}", f"{v['path']} ({_size(v['bytes'])})") for k, v in facts["caches"].items()),
        *((part, "yes" if ok else "no (missing: " + ", ".join(
            n for n in OPTIONAL_PARTS[part] if facts["packages"][n] is None) + ")")
          for part, ok in facts["optional"].items()),
        ("default model", f"{dm['name']}: " + (dm["path"] if dm["present"] else "not on this machine "
                                                 f"(downloaded on first use, about {dm['download_mb']} MB)")),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
