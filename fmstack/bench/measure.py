"""What one benchmark run measures and how: a timed generation (`Run`), a measured system (`System`),
peak memory, the torch.compile counters, the prompts and the device's name."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

from fmstack.backends import compile_counters
from fmstack.errors import ParameterError


@dataclass
class Run:
    """One timed generation: `steps` decode steps after the prefill, for `batch` rows."""
    ttft_s: float
    decode_s: float
    steps: int
    batch: int


@dataclass
class System:
    """One measured system: how to generate (prompts [B, L] int64, new_tokens) -> Run, and its results."""
    name: str
    label: str
    weight_bytes: int
    load_s: float
    vocab_size: int
    generate: Callable[[torch.Tensor, int], Run]
    runs: dict[int, list[Run]] = field(default_factory=dict)
    peak_mem: dict[int, dict[str, float]] = field(default_factory=dict)
    max_batch: int | None = None  # largest batch size it runs (None: any)
    extra: dict = field(default_factory=dict)  # per-system figures for the report (e.g. acceptance)

    def runs_batch(self, batch: int) -> bool:
        return self.max_batch is None or batch <= self.max_batch


class Memory:
    """Peak memory over a region: process peak RSS on CPU (VmHWM, reset through
    /proc/self/clear_refs), peak allocated bytes on CUDA. Both count every loaded system's weights."""

    def __init__(self, device: torch.device):
        self.device = device

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return proc_status_kb("VmRSS") * 1024

    def reset_peak(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False  # not Linux, or not allowed: the peak is then the process lifetime peak

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        kb = proc_status_kb("VmHWM")
        if kb:
            return kb * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status_kb(key: str) -> int:
    """A `kB` field of /proc/self/status (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def sync(device: torch.device) -> None:
    """Wait for the device, so that host timers measure its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def compile_counts() -> dict[str, int]:
    """What torch.compile has done so far in this process: graphs compiled (one per compile or
    recompile), frames compiled, graph breaks, and Inductor's CUDA-graph skips. The difference of two
    readings counts a region; all zero without compilation (Dynamo's counters, read in
    `fmstack.backends`)."""
    return compile_counters()


def compile_counts_since(before: dict[str, int]) -> dict[str, int]:
    now = compile_counts()
    return {k: now[k] - before[k] for k in now}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({os.cpu_count()} logical CPUs, ATen {cap})"


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 6) for v in values]}


TEXT_PROMPT = (
    "The history of the lighthouse begins in the ancient world, where fires burned on hilltops to guide "
    "ships home at night. The most famous of these early towers stood on the island of Pharos, near the "
    "harbour of Alexandria, and for centuries it was counted among the wonders of the world. Later builders "
    "in Europe raised stone towers along dangerous coasts, and keepers climbed the stairs every evening to "
    "trim the wicks and polish the lenses. "
)


def prompt_tokens(kind: str, tokenizer, batch: int, length: int, vocab: int, generator: torch.Generator):
    """`[batch, length]` int64 prompt ids: random ids, or TEXT_PROMPT's tokens repeated (needs a tokenizer)."""
    if kind == "random":
        return torch.randint(0, vocab, (batch, length), generator=generator)
    if tokenizer is None:
        raise ParameterError("--prompt text needs a model with a tokenizer (random: models have none)")
    ids = tokenizer.encode(TEXT_PROMPT, add_bos=False)
    ids = (ids * (length // len(ids) + 1))[:length]
    return torch.tensor([ids] * batch)
