"""dist.py: joining the job has no hidden process-wide effects (seeding, stdout) — those are
separate, named functions; the collective timeout and its validation."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch
import torch.distributed as tdist

from fmstack.errors import FmstackError
from fmstack.parallel import dist
from tests.helpers import free_port


def _as_rank(monkeypatch, rank: int, world: int = 2) -> None:
    for k, v in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank}.items():
        monkeypatch.setenv(k, str(v))


def test_init_distributed_touches_no_rng_or_stdout(monkeypatch):
    """A one-rank gloo job: joining leaves torch's default RNG and sys.stdout as they were."""
    _as_rank(monkeypatch, 0, world=1)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.manual_seed(1234)
    before, stdout = torch.get_rng_state(), sys.stdout
    try:
        info = dist.init_distributed("cpu")
        assert (info.rank, info.world_size) == (0, 1) and not hasattr(info, "is_main")
        assert torch.equal(torch.get_rng_state(), before) and sys.stdout is stdout
        dist.seed_ranks_alike()  # the explicit call: seed 0 everywhere
        assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(0).get_state())
    finally:
        dist.shutdown()
    assert not tdist.is_initialized()


def test_rank_output_settings_are_pure(monkeypatch):
    _as_rank(monkeypatch, 1)
    stdout = sys.stdout
    assert dist.rank_output_settings("fmstack", logging.INFO) == ("fmstack (rank 1)", logging.WARNING)
    assert sys.stdout is stdout
    _as_rank(monkeypatch, 0)
    assert dist.rank_output_settings("fmstack", logging.DEBUG) == ("fmstack", logging.DEBUG)


@pytest.mark.parametrize("rank", [0, 1])
def test_silence_other_ranks(monkeypatch, rank):
    _as_rank(monkeypatch, rank)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    mine = io.StringIO()
    monkeypatch.setattr(sys, "stdout", mine)
    dist.silence_other_ranks()
    silenced = sys.stdout is not mine
    if silenced:
        sys.stdout.close()
    assert silenced == (rank != 0)


def test_timeout(monkeypatch):
    monkeypatch.delenv("FMSTACK_DIST_TIMEOUT_S", raising=False)
    assert dist.timeout_s() == dist.DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv("FMSTACK_DIST_TIMEOUT_S", "10")
    assert dist.timeout_s() == 10.0
    for bad in ["0", "-3", "ten", "inf", "nan", ""]:
        monkeypatch.setenv("FMSTACK_DIST_TIMEOUT_S", bad)
        with pytest.raises(FmstackError, match=f"FMSTACK_DIST_TIMEOUT_S={bad!r}: expected a positive number"):
            dist.timeout_s()


def test_global_rank_of_the_default_group():
    assert dist.global_rank(None, 3) == 3
