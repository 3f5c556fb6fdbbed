"""A damaged or foreign OUT/train_state.pt on `--resume` is a one-line FmstackError naming the file and
what is wrong with it (unreadable, refused as unsafe, not a fine-tuning state, does not fit), and an
unsafe pickle in it is never run."""

from __future__ import annotations

import pytest
import torch

from fmstack.errors import FmstackError
from fmstack.train.loop import STATE_FILE
from tests.helpers import TouchOnUnpickle
from tests.train.test_loop import trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real resume state after one LoRA step, and its loaded contents."""
    out = tmp_path_factory.mktemp("run")
    t = trainer(lora_rank=2)
    t.train_step()
    t.save_state(out)
    return out / STATE_FILE, torch.load(out / STATE_FILE, weights_only=True)


def _resume_error(path, *match):
    with pytest.raises(FmstackError) as info:
        trainer(lora_rank=2).load_state(path.parent)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"--resume: {path}"), msg
    for m in match:
        assert m in msg, msg
    return msg


def test_intact_state_resumes(saved, tmp_path):
    path, _ = saved
    t = trainer(lora_rank=2)
    assert t.load_state(path.parent) and t.step == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_state(saved, tmp_path, damage):
    path = tmp_path / STATE_FILE
    data = saved[0].read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x80\x02garbage" * 50, "empty": b""}[damage])
    _resume_error(path, "cannot load PyTorch checkpoint (truncated or corrupt")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_unsafe_state_is_refused_and_not_run(saved, tmp_path, zip_format):
    path, state = tmp_path / STATE_FILE, dict(saved[1])
    marker = tmp_path / "payload-ran"
    state["extra"] = TouchOnUnpickle(marker)
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    msg = _resume_error(path, "refused to load as unsafe", "weights_only=True")
    assert "corrupt" not in msg and not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


@pytest.mark.parametrize("content, match", [
    ([1, 2, 3], "is not a training state written by fmstack finetune (missing model, optimizer"),
    ("drop-rng", "is not a training state written by fmstack finetune (missing rng)"),
])
def test_foreign_state(saved, tmp_path, content, match):
    path = tmp_path / STATE_FILE
    if content == "drop-rng":
        content = {k: v for k, v in saved[1].items() if k != "rng"}
    torch.save(content, path)
    _resume_error(path, match)


@pytest.mark.parametrize("entry, value", [("optimizer", {"state": {}, "param_groups": []}),
                                          ("rng", torch.zeros(3)),
                                          ("scheduler", {"no": "such field"})])
def test_state_that_does_not_fit(saved, tmp_path, entry, value):
    path = tmp_path / STATE_FILE
    torch.save({**saved[1], entry: value}, path)
    _resume_error(path, "does not fit this run's model and optimizer")


def test_cli_resume_from_corrupt_state(tiny_tok_dir, qa_jsonl, tmp_path, capsys):
    from fmstack.cli import main

    out = tmp_path / "ft"
    out.mkdir()
    (out / STATE_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    args = ["finetune", "--model", str(tiny_tok_dir), "--data", str(qa_jsonl), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--no-compile", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fmstack: error: --resume: {out / STATE_FILE}: cannot load"), err
