"""Compiled steps persisted across processes, under `<fmstack cache dir>/compile/`, two kinds:

  whole steps (CPU, the default for `Generator`'s steps): Dynamo's traced bytecode, guards and
    Inductor's code, saved by `torch.compile(...).aot_compile` and loaded without tracing
    (`fmstack.backends.precompile`, written and read through `write`/`read`). Why: with the caches
    below alone a warm process still traced every step again: 7.1-7.3 s from loaded weights to the
    first tokens of SmolLM2-135M fp32 batch 1 on the 2-core Xeon, 1.4-1.5 s with whole steps (1 thread,
    same load; docs/compile.md, "Warm start").
  bundles of torch.compile's cache artifacts (`torch.compiler.save_cache_artifacts`: AOTAutograd's
    and Inductor's FX graph entries), loaded before a step's first compile (`load`/`save`), so
    Inductor neither lowers nor builds C++ again: the path where whole steps are off
    ($FMSTACK_PRECOMPILE=0), unavailable or fail, and for the serving engine's steps.

A key is what makes an entry valid: the model config, the activation dtype, the quantization scheme
and module types, the step (what, batch size, token count, greedy/sampled; for a whole step also
every argument's dtype and shape, the KV cache's buffers), the torch version and the CPU ISA. Any
change is another file (a miss, compiled and saved). A whole step also records the sha256 of every
source file Dynamo traced through (a changed file: traced again) and of its own bytes. An entry
that cannot be used (corrupt, truncated) is deleted and rebuilt, with one warning.

    cache = CompileCache.for_model(model, dtype)
    LoggedCompile(fn, "decode step", store=cache, precompile=True, ...)  # loads, else compiles and saves
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmstack import native
from fmstack.backends.inductor import set_cache_dir, user_cache_dir
from fmstack.paths import cache_dir
from fmstack.quant import spec_of

log = logging.getLogger(__name__)

SUFFIX = ".bin"
PRECOMPILE_ENV = "FMSTACK_PRECOMPILE"


def compile_cache_dir() -> Path:
    """`<fmstack cache dir>/compile` ($FMSTACK_CACHE_DIR, else ~/.cache/fmstack: `checkpoints.named.cache_dir`)."""
    return cache_dir() / "compile"


def kernel_cache_dir() -> Path:
    """Where Inductor keeps its caches (FX graphs, AOTAutograd entries, the built `.so` libraries):
    `$TORCHINDUCTOR_CACHE_DIR` where the user set it, else `<fmstack cache dir>/inductor`, so that a
    compiled step's libraries persist next to its bundle (Inductor's default, /tmp/torchinductor_<user>,
    is wiped with /tmp, and without the libraries a later process builds the C++ again)."""
    user = user_cache_dir()
    return Path(user) if user else cache_dir() / "inductor"


def use_kernel_cache_dir() -> Path:
    """Point Inductor at `kernel_cache_dir()` for this process and return it."""
    path = kernel_cache_dir()
    set_cache_dir(path)
    return path


def model_fingerprint(model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """What a compiled graph of `model` depends on besides the step: its config, the activation dtype,
    the quantization scheme, the module and parameter types, block layouts (GGUF files of one model
    differ there), torch, the CPU ISA, and on CPU whether fmstack's native ops are in use (the traced
    code calls them only then; asking loads them, which a saved step that calls them needs before
    its first call: it is not traced, so nothing else would)."""
    config = getattr(model, "config", None)
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
    spec = spec_of(model)
    device = str(next(model.parameters()).device.type)
    return {"config": config, "dtype": str(dtype), "quant": spec.to_dict() if spec else None,
            "modules": sorted({type(m).__qualname__ for m in model.modules()}),
            "blocks": sorted({repr(m.layout) for m in model.modules() if hasattr(m, "packed_blocks")}),
            "params": sorted({str(p.dtype) for p in model.parameters()}),
            "device": device, "native": native.available() if device == "cpu" else None,
            "torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability()}


def precompile_wanted(fingerprint: dict[str, Any]) -> bool:
    """Whether steps are saved whole (`fmstack.backends.precompile`): on CPU (CUDA graphs are not
    saved), in a single process (a tensor-parallel rank's graph holds its rank: another rank must not
    load it), unless $FMSTACK_PRECOMPILE is "0" (then each process traces again and loads the caches'
    artifacts)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return fingerprint.get("device") == "cpu" and not distributed and os.environ.get(PRECOMPILE_ENV, "1") != "0"


class CompileCache:
    """Bundles of compile artifacts for one model fingerprint, one file per step under `root`."""

    def __init__(self, fingerprint: dict[str, Any], root: Path | None = None):
        self.fingerprint = fingerprint
        self.root = root or compile_cache_dir()
        self.loaded: set[Path] = set()
        self.inductor_dir = use_kernel_cache_dir()
        self.precompile = precompile_wanted(fingerprint)

    def where(self) -> str:
        """The cache's directories, for the compile log lines."""
        return f"{self.root} (Inductor: {self.inductor_dir})"

    @classmethod
    def for_model(cls, model: nn.Module, dtype: torch.dtype, root: Path | None = None) -> "CompileCache":
        return cls(model_fingerprint(model, dtype), root)

    def key(self, what: str, label: tuple[str, ...]) -> dict[str, Any]:
        return {**self.fingerprint, "step": what, "shape": list(label)}

    def path(self, what: str, label: tuple[str, ...]) -> Path:
        blob = json.dumps(self.key(what, label), sort_keys=True, default=str).encode()
        return self.root / f"{hashlib.sha256(blob).hexdigest()[:32]}{SUFFIX}"

    def has(self, what: str, label: tuple[str, ...]) -> bool:
        """Whether the step's bundle is there (loaded already, or on disk)."""
        return self.path(what, label) in self.loaded or self.path(what, label).is_file()

    def load(self, what: str, label: tuple[str, ...]) -> bool:
        """Hot-load the step's bundle into torch's caches; False on a miss. A bundle torch cannot
        read is deleted (one warning) and the step compiles as on a miss."""
        path = self.path(what, label)
        if path in self.loaded:
            return True
        if not path.is_file():
            return False
        try:  # torch logs and returns None for a bundle it cannot un-pickle; it may also raise
            info = torch.compiler.load_cache_artifacts(path.read_bytes())
            problem = None if info is not None else "torch could not un-pickle it"
        except Exception as e:  # noqa: BLE001 - any unreadable bundle is rebuilt, whatever torch raises
            problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            self.discard(what, label, problem)
            return False
        self.loaded.add(path)
        return True

    def save(self, what: str, label: tuple[str, ...]) -> Path | None:
        """Write what this process compiled so far as the step's bundle (atomically: a crash leaves
        no half file) with its key beside it (`.json`, for `fmstack cache info`)."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        path = self.write(what, label, saved[0])
        self.loaded.add(path)
        return path

    def write(self, what: str, label: tuple[str, ...], data: bytes, meta: dict[str, Any] | None = None) -> Path:
        """Store `data` as the entry `what`/`label`, atomically (a crash leaves no half file), with its
        key and `meta` beside it (`.json`; with `meta` also the data's sha256, which `read` checks)."""
        path = self.path(what, label)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = self.key(what, label)
        if meta is not None:
            key["meta"] = {**meta, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        tmp.write_text(json.dumps(key, indent=1, default=str))
        tmp.replace(path.with_suffix(".json"))
        return path

    def read(self, what: str, label: tuple[str, ...]) -> tuple[bytes, dict[str, Any]] | None:
        """The entry `what`/`label` written with `meta`: (data, meta); None on a miss. An entry whose key
        file is unreadable or whose data does not match its recorded sha256 (truncated, corrupt) is
        discarded (one warning) and read as a miss."""
        path = self.path(what, label)
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.with_suffix(".json").read_text())["meta"]
            data = path.read_bytes()
            problem = None if hashlib.sha256(data).hexdigest() == meta["sha256"] else "its checksum does not match"
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"its key file is unreadable: {type(e).__name__}: {e}"
        if problem is not None:
            self.discard(what, label, problem)
            return None
        return data, meta

    def discard(self, what: str, label: tuple[str, ...], problem: str) -> None:
        """Delete the entry `what`/`label`, which could not be used, with one warning saying why."""
        path = self.path(what, label)
        log.warning("compile cache entry %s for %s (%s) is unreadable (%s): deleted, compiling again",
                    path, what, ", ".join(label), problem)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)


def cache_entries(root: Path | None = None) -> list[dict[str, Any]]:
    """The bundles under `root` (default `compile_cache_dir()`): path, bytes and their key (None
    where the key file is missing or unreadable)."""
    root = root or compile_cache_dir()
    entries = []
    for path in sorted(root.glob(f"*{SUFFIX}")) if root.is_dir() else []:
        try:
            key = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            key = None
        entries.append({"path": str(path), "bytes": path.stat().st_size, "key": key})
    return entries


def clear_cache(root: Path | None = None) -> int:
    """Delete `root` (default `compile_cache_dir()`, and fmstack's own Inductor directory with it) and
    everything in it; returns the bytes freed. A user-set `$TORCHINDUCTOR_CACHE_DIR` is left alone."""
    roots = [root] if root is not None else [compile_cache_dir()] + ([] if user_cache_dir() else [kernel_cache_dir()])
    freed = 0
    for r in (r for r in roots if r.is_dir()):
        freed += sum(p.stat().st_size for p in r.rglob("*") if p.is_file())
        shutil.rmtree(r)
    return freed
