"""Inductor's vector-ISA probe, decided once per machine instead of once per process, and off the
critical path where it still has to run.

Before its first C++ kernel a process asks Inductor which vector ISAs the CPU and the compiler can
use, and Inductor answers by building a test library per candidate ISA and per extension and loading
each in a child Python (`torch._inductor.cpu_vec_isa`). On the 2-core AVX-512/AMX Xeon that is 10
g++ runs, one after the other inside the compile: 4 x ~1.7 s (ATen's vector headers with each ISA's
flags) + 6 x ~0.4 s (the bf16, VNNI and AMX intrinsics), ~10 s of the 38 s cold compile of the
default model (docs/compile.md, "Cold compile: where the time goes").

The answer depends on the CPU, the compiler and torch only. So every test build's outcome is
recorded under a key made of exactly those (the CPU's ISA flags as torch reads them, the compiler's
resolved path and `-v` output, torch's version and library directory, the Python executable) in
`<fmstack cache dir>/isa/<key>.json`, and a later process on the same machine replays the outcomes:
Inductor runs its own probe code, with each test build answered from the record instead of built.
Nothing is assumed beyond what that machine showed:
  - a record whose stored key differs from this process's key is not used (another CPU, compiler,
    torch: the probe runs and records afresh);
  - a test the record does not hold (another flag set, another test source after a torch change) is
    built as Inductor builds it;
  - the CPU's flags are read live: an ISA the CPU does not report is never a candidate, whatever a
    record says, and AMX's OS permission (`torch.cpu._init_amx`) is asked live too.
The record survives `fmstack cache clear` (like the native kernels: a fact of the install, not of a
model). x86-64 only (the probe measured here); elsewhere Inductor probes as it does.

Where no record exists yet, `prefetch` runs the probe in a background thread as soon as a CPU step
starts compiling, so its compiler runs on a second core while Dynamo traces; a call of Inductor's
`valid_vec_isa_list` in the meantime waits for that thread instead of probing a second time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fmstack.backends.gate import symbol
from fmstack.paths import cache_dir

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
_lock = threading.RLock()
_thread: threading.Thread | None = None


def record_dir() -> Path:
    """`<fmstack cache dir>/isa`: where probe records live."""
    return cache_dir() / "isa"


def _isa_module() -> Any | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    return symbol("inductor.cpu_vec_isa")


def probe_key() -> dict[str, Any]:
    """What Inductor's probe outcome depends on, in words (x86-64): the CPU's ISA flags as torch reads
    them, the compiler (resolved path, `-v` output), torch (version, library directory) and the Python
    that loads the test libraries."""
    isa, builder = symbol("inductor.cpu_vec_isa"), symbol("inductor.cpp_builder")
    cxx = builder.get_cpp_compiler()
    cpu = torch.cpu
    return {"format": RECORD_FORMAT, "machine": platform.machine(), "cpu": list(isa.x86_isa_checker()),
            "avx512_bf16": bool(cpu._is_avx512_bf16_supported()), "amx_fp16": bool(cpu._is_amx_fp16_supported()),
            "compiler": os.path.realpath(shutil.which(cxx) or cxx),
            "compiler_version": builder.get_compiler_version_info(cxx),
            "torch": torch.__version__, "torch_lib": str(Path(torch.__file__).resolve().parent / "lib"),
            "python": os.path.realpath(sys.executable)}


def record_path(key: dict[str, Any], directory: Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"{digest}.json"


def read_record(path: Path, key: dict[str, Any]) -> dict[str, bool] | None:
    """The test outcomes recorded at `path` for exactly `key`; None where there is no such record or
    it is unreadable, malformed or made under another key."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    outcomes = data.get("outcomes") if isinstance(data, dict) else None
    if data.get("key") != key or not isinstance(outcomes, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, bool) for k, v in outcomes.items()):
        return None
    return outcomes


def write_record(path: Path, key: dict[str, Any], outcomes: dict[str, bool]) -> None:
    """Save `outcomes` for `key` at `path` (written whole: a reader never sees half a record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps({"key": key, "outcomes": outcomes}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def check_name(vec: Any, code: str) -> str:
    """One test build in words: the ISA, the flags it is built with, the test source's digest."""
    return f"{vec} | {vec.build_arch_flags()} | {hashlib.sha256(code.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def answered_from(record: dict[str, bool] | None, outcomes: dict[str, bool]) -> Iterator[None]:
    """While inside: Inductor's test builds (`VecISA.check_build`) answered from `record` where it
    holds that test, built as usual otherwise; every outcome is put in `outcomes`."""
    cls = symbol("inductor.cpu_vec_isa").VecISA
    build = cls.__dict__["check_build"]

    def check_build(vec: Any, code: str) -> bool:
        name = check_name(vec, code)
        ok = record[name] if record is not None and name in record else bool(build(vec, code))
        outcomes[name] = ok
        return ok

    with _lock:
        cls.check_build = check_build
        try:
            yield
        finally:
            cls.check_build = build


def settle(directory: Path | None = None, valid_list: Callable[[], list] | None = None) -> list[str] | None:
    """Inductor's ISA verdict for this process (its cached `valid_vec_isa_list`), replayed from the
    record in `directory` (default `record_dir()`) where one exists for this machine, else probed and
    recorded there; the valid ISAs' names. None off x86-64 or where the gate has no Inductor."""
    isa = _isa_module()
    if isa is None:
        return None
    valid_list = valid_list or isa.valid_vec_isa_list
    with _lock:
        if valid_list.cache_info().currsize:
            return [str(v) for v in valid_list()]
        key = probe_key()
        path = record_path(key, directory or record_dir())
        record = read_record(path, key)
        outcomes: dict[str, bool] = {}
        t0 = time.perf_counter()
        with answered_from(record, outcomes):
            valid = [str(v) for v in valid_list()]
        built = [name for name in outcomes if record is None or name not in record]
        if built:
            with contextlib.suppress(OSError):  # an unwritable cache only costs the next process the probe
                write_record(path, key, {**(record or {}), **outcomes})
        log.info("vector ISAs for Inductor: %s (%d test build(s), %d replayed from %s, %.1f s)", ", ".join(valid) or "none",
                 len(built), len(outcomes) - len(built), path, time.perf_counter() - t0)
        return valid


def has_record(directory: Path | None = None) -> bool:
    """Whether this machine's probe outcomes are recorded in `directory` (default `record_dir()`)."""
    if _isa_module() is None:
        return False
    key = probe_key()
    return read_record(record_path(key, directory or record_dir()), key) is not None


def prefetch(directory: Path | None = None) -> None:
    """Make Inductor's ISA verdict ready before its first C++ kernel needs it: replayed at once where
    recorded (`settle`), else probed in a background thread while the caller goes on tracing; until
    that thread ends, Inductor's `valid_vec_isa_list` waits for it. Once per process."""
    global _thread
    isa = _isa_module()
    if isa is None or _thread is not None or isa.valid_vec_isa_list.cache_info().currsize:
        return
    if has_record(directory):
        settle(directory)
        return
    original = isa.valid_vec_isa_list

    def waiting() -> list:
        if _thread is not None and _thread is not threading.current_thread() and _thread.is_alive():
            t0 = time.perf_counter()
            _thread.join()
            log.info("waited %.1f s for the background vector-ISA probe", time.perf_counter() - t0)
        return original()

    waiting.cache_info, waiting.cache_clear = original.cache_info, original.cache_clear  # type: ignore[attr-defined]

    def run() -> None:
        try:
            settle(directory, original)
        except Exception as e:  # noqa: BLE001 - Inductor then probes itself, as it would have
            log.warning("background vector-ISA probe failed (%s: %s): Inductor probes when it needs it", type(e).__name__, e)
        finally:
            if isa.valid_vec_isa_list is waiting:
                isa.valid_vec_isa_list = original

    _thread = threading.Thread(target=run, name="fmstack-vec-isa-probe", daemon=True)
    isa.valid_vec_isa_list = waiting
    _thread.start()


def wait() -> None:
    """Wait for a background probe started by `prefetch` (no-op where none runs)."""
    if _thread is not None:
        _thread.join()
