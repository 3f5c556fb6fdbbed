"""Process groups under torchrun: gloo on CPU, NCCL on CUDA; rank-0-only output; bounded waits.

Every collective has a timeout (`FMSTACK_DIST_TIMEOUT_S`, default 600 s), so a rank that dies or
fails makes the others fail with an error instead of hanging; `fail_together` turns a user error on
any one rank into the same clear error on rank 0. A rank that exits makes gloo fail the others'
pending send/recv/collectives at once (connection closed), and torchrun stops the remaining ranks
(SIGTERM, reported as one error line): that does not wait for the timeout. Only a rank that stalls
makes the others wait it out; on NCCL the watchdog aborts the stalled collective after it.

Why 600 s: a collective also waits while a peer compiles. A pipeline stage's `--compile` graphs
are built inside its first forward, while the next stage already waits in its first recv; a cold
compile of the default 135M model alone measured 102 s on CPU (README, `fmstack generate
--compile`), 18 s short of the former 120 s default, and a stage of a larger model on a GPU
(reduce-overhead, CUDA graphs) takes several times that. Lower it (tests use 10 s) to find a stall
sooner. `fault_point` is the test hook.

Process-wide side effects are separate, named functions that the entry point calls explicitly:
`seed_ranks_alike` (the default torch RNG), `silence_other_ranks` (replaces `sys.stdout` on ranks
other than 0) and `report_launcher_stop` (a SIGTERM handler); `init_distributed` only joins the job.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fmstack.errors import FmstackError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600  # see the module docstring: long enough for a peer's cold compile


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_s() -> float:
    """`FMSTACK_DIST_TIMEOUT_S` (seconds, > 0), default `DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get("FMSTACK_DIST_TIMEOUT_S")
    if raw is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise FmstackError(f"FMSTACK_DIST_TIMEOUT_S={raw!r}: expected a positive number of seconds "
                           f"(default {DEFAULT_TIMEOUT_S})")
    return value


def init_distributed(device: str | torch.device = "cpu") -> DistInfo:
    """Join the torchrun job (idempotent). CUDA ranks use cuda:LOCAL_RANK and NCCL, CPU ranks gloo.
    Touches no other process state (no seeding, no output redirection: see the module docstring)."""
    if not launched_by_torchrun():
        raise FmstackError("--parallel needs several processes: launch with "
                           "`torchrun --standalone --nproc-per-node N -m fmstack ...`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistInfo(rank, world, local_rank, device)


def seed_ranks_alike(seed: int = 0) -> None:
    """Seed torch's default RNG with the same value on every rank, so code that samples without its
    own generator draws the same numbers everywhere (ranks must agree on sampled tokens)."""
    torch.manual_seed(seed)


def global_rank(group, rank: int) -> int:
    """The global rank of `group`'s member `rank` (point-to-point ops and `src=` take global ranks)."""
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def fail_together(error: BaseException | None) -> None:
    """Collective: if any rank had an error, every rank raises: a failed rank its own error, the
    others an FmstackError naming the failed ranks and their messages."""
    msgs: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    bad = {r: m for r, m in enumerate(msgs) if m is not None}
    if bad:
        raise FmstackError("; ".join(f"rank {r} failed: {m}" for r, m in bad.items()))


def failure_message(error: BaseException) -> str | None:
    """A one-line explanation when `error` is a collective that failed because another rank died,
    raised, or stalled past the timeout; None for other errors."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    dist_errors = (dist.DistError,) if hasattr(dist, "DistError") else ()
    markers = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "closed")
    if isinstance(error, dist_errors) or (isinstance(error, RuntimeError) and
                                          any(m in text.lower() for m in markers)):
        return (f"another rank exited or stalled (collective failed or exceeded FMSTACK_DIST_TIMEOUT_S="
                f"{timeout_s():g}s): {text}")
    return None


_fault_hits: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Test hook. FMSTACK_TEST_FAULT="RANK:POINT:ACTION[:N]" makes rank RANK, at its N-th (default
    1st) pass through `point`, `exit` (code 3, no cleanup), `raise` a ParameterError, or `hang`."""
    spec = os.environ.get("FMSTACK_TEST_FAULT")
    if not spec or not dist.is_initialized():
        return
    rank, where, action, *n = spec.split(":")
    if int(rank) != dist.get_rank() or where != point:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] != int(n[0] if n else 1):
        return
    log.warning("FMSTACK_TEST_FAULT: rank %s %s at %s", rank, action, point)
    if action == "exit":
        os._exit(3)
    if action == "hang":
        while True:
            time.sleep(60)
    from fmstack.errors import ParameterError

    raise ParameterError(f"FMSTACK_TEST_FAULT: injected bad argument on rank {rank}")


def launcher_rank() -> int:
    """This process's rank under torchrun (from the environment, before any process group); 0 otherwise."""
    return int(os.environ.get("RANK", 0)) if launched_by_torchrun() else 0


def rank_output_settings(prog: str, level: int) -> tuple[str, int]:
    """(error prefix, log level) for this rank: ranks other than 0 tag their error lines with the
    rank and log at WARNING or above. Pure: changes nothing."""
    rank = launcher_rank()
    if rank == 0:
        return prog, level
    return f"{prog} (rank {rank})", max(level, logging.WARNING)


def silence_other_ranks() -> None:
    """Process-wide: on ranks other than 0, replace `sys.stdout` with /dev/null and disable tqdm
    progress bars (TQDM_DISABLE), so a command's output is printed once, by rank 0."""
    if launcher_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"


def report_launcher_stop(prog: str) -> None:
    """Process-wide, under torchrun: install a SIGTERM handler that prints one error line and exits
    143 (torchrun stops the other ranks with SIGTERM when one fails). Undo with `restore_sigterm`."""
    if not launched_by_torchrun():
        return

    def stopped(_sig, _frame):
        sys.stderr.write(f"{prog}: error: stopped by the launcher because another rank failed "
                         "(see its error above and torchrun's report)\n")
        sys.stderr.flush()
        os._exit(143)
    signal.signal(signal.SIGTERM, stopped)


def restore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
