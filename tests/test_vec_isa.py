"""fmstack.backends.vec_isa: Inductor's vector-ISA probe recorded once per machine and replayed, the
refusals (another machine's record, an ISA the CPU does not report, a test not recorded), and the
background probe that Inductor waits for. Inductor's probe state is swapped for a fresh one per test
and its test builds are faked (no compiler runs), so these take milliseconds."""

import functools
import importlib
import json
import platform
import threading
import time

import pytest

from fmstack.backends import vec_isa

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 probe only")

ALL = ["avx2", "avx512", "avx512_vnni", "amx_tile"]


class FakeBuilds:
    """Stands for `VecISA.check_build`: counts the builds; `fails` holds ISA names whose builds fail."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[str] = []
        self.fails: set[str] = set()
        self.delay = delay

    def __call__(self, vec, code: str) -> bool:
        time.sleep(self.delay)
        self.calls.append(str(vec))
        return str(vec) not in self.fails


@pytest.fixture
def probe(monkeypatch):
    """A fresh Inductor probe state (its caches and ISA objects; restored afterwards) with faked builds
    and CPU flags `probe.flags` (default: avx2 and avx512 only, so AMX's OS check never matters)."""
    isa = importlib.import_module("torch._inductor.cpu_vec_isa")
    for cls in (isa.VecAMX, isa.VecAVX512VNNI, isa.VecAVX512):
        monkeypatch.setattr(cls, "__bool__", functools.cache(cls.__dict__["__bool__"].__wrapped__))
    impl = "_VecISA__bool__impl"
    monkeypatch.setattr(isa.VecISA, impl, functools.cache(isa.VecISA.__dict__[impl].__wrapped__))
    monkeypatch.setattr(isa, "valid_vec_isa_list", functools.cache(isa.valid_vec_isa_list.__wrapped__))
    builds = FakeBuilds()
    monkeypatch.setattr(isa.VecISA, "check_build", builds)
    builds.flags = ["avx2", "avx512"]
    monkeypatch.setattr(isa, "x86_isa_checker", lambda: list(builds.flags))
    monkeypatch.setattr(vec_isa, "_thread", None)

    def forget() -> None:  # a new process: Inductor's caches and ISA objects empty again
        monkeypatch.setattr(isa, "supported_vec_isa_list", [type(v)() for v in isa.supported_vec_isa_list])
        for cls in (isa.VecAMX, isa.VecAVX512VNNI, isa.VecAVX512):
            cls.__bool__.cache_clear()
        getattr(isa.VecISA, impl).cache_clear()
        isa.valid_vec_isa_list.cache_clear()

    forget()
    builds.forget, builds.isa = forget, isa
    return builds


def test_probe_recorded_then_replayed_without_builds(probe, tmp_path):
    first = vec_isa.settle(tmp_path)
    assert first == ["avx512", "avx2"] and probe.calls
    [record] = list(tmp_path.glob("*.json"))
    assert all(json.loads(record.read_text())["outcomes"].values())
    built = len(probe.calls)
    probe.forget()
    assert vec_isa.settle(tmp_path) == first
    assert len(probe.calls) == built, "a recorded machine builds no test library"
    assert vec_isa.has_record(tmp_path)


def test_recorded_failure_is_replayed_as_failure(probe, tmp_path):
    probe.fails = {"avx512"}
    assert vec_isa.settle(tmp_path) == ["avx2"]
    built = len(probe.calls)
    probe.fails = set()  # the record, not a build, must answer
    probe.forget()
    assert vec_isa.settle(tmp_path) == ["avx2"] and len(probe.calls) == built


def test_record_of_another_machine_is_refused(probe, tmp_path):
    vec_isa.settle(tmp_path)  # recorded on a CPU with AVX-512
    [record] = list(tmp_path.glob("*.json"))
    probe.flags = ["avx2"]  # now a CPU without it; its record path gets the AVX-512 machine's record
    probe.forget()
    key = vec_isa.probe_key()
    assert vec_isa.read_record(record, key) is None
    vec_isa.record_path(key, tmp_path).write_text(record.read_text())
    built = len(probe.calls)
    assert vec_isa.settle(tmp_path) == ["avx2"]
    assert len(probe.calls) > built, "another machine's record is not replayed: the probe builds"


def test_replay_never_admits_an_isa_the_cpu_does_not_report(probe):
    probe.flags = ["avx2"]
    everything = {}
    with vec_isa.answered_from(None, everything):  # record what an all-capable machine would say ...
        probe.flags = ALL
        probe.isa.valid_vec_isa_list()
    probe.flags = ["avx2"]
    probe.forget()
    built = len(probe.calls)
    with vec_isa.answered_from({k: True for k in everything}, {}):  # ... and replay it on an AVX2-only CPU
        assert [str(v) for v in probe.isa.valid_vec_isa_list()] == ["avx2"]
    assert len(probe.calls) == built


def test_test_missing_from_the_record_is_built(probe, tmp_path):
    vec_isa.settle(tmp_path)
    [record] = list(tmp_path.glob("*.json"))
    data = json.loads(record.read_text())
    dropped = min(data["outcomes"])
    del data["outcomes"][dropped]
    record.write_text(json.dumps(data))
    probe.forget()
    built = len(probe.calls)
    vec_isa.settle(tmp_path)
    assert len(probe.calls) == built + 1
    assert dropped in json.loads(record.read_text())["outcomes"], "the built outcome is added to the record"


@pytest.mark.parametrize("content", ["{not json", '{"key": {}, "outcomes": {}}', '{"key": 1, "outcomes": {"a": "yes"}}'])
def test_unreadable_record_is_probed_again(probe, tmp_path, content):
    key = vec_isa.probe_key()
    path = vec_isa.record_path(key, tmp_path)
    path.write_text(content)
    assert vec_isa.read_record(path, key) is None
    assert vec_isa.settle(tmp_path) == ["avx512", "avx2"] and probe.calls
    assert vec_isa.read_record(path, key) is not None


def test_background_probe_is_waited_for_not_repeated(probe, tmp_path):
    probe.delay = 0.05
    original = probe.isa.valid_vec_isa_list
    vec_isa.prefetch(tmp_path)
    assert vec_isa._thread is not None and vec_isa._thread.is_alive(), "the caller goes on while it probes"
    assert vec_isa._thread is not threading.current_thread()
    valid = [str(v) for v in probe.isa.valid_vec_isa_list()]  # Inductor asks while the thread probes
    assert valid == ["avx512", "avx2"]
    vec_isa.wait()
    builds = len(probe.calls)
    assert builds == len(json.loads(next(tmp_path.glob("*.json")).read_text())["outcomes"]), "probed once"
    assert probe.isa.valid_vec_isa_list is original
    vec_isa.prefetch(tmp_path)  # once per process
    assert len(probe.calls) == builds


def test_prefetch_replays_at_once_where_recorded(probe, tmp_path):
    vec_isa.settle(tmp_path)
    probe.forget()
    built = len(probe.calls)
    vec_isa.prefetch(tmp_path)
    assert vec_isa._thread is None and probe.isa.valid_vec_isa_list.cache_info().currsize
    assert len(probe.calls) == built
