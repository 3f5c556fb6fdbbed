"""The loop: schedule, gradient accumulation, LoRA merge, resume, memorising a text, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fmstack.loading import load_model
from fmstack.train.data import IGNORE, TokenDataset
from fmstack.train.loop import STATE_FILE, TrainConfig, Trainer, lr_factor
from fmstack.train.lora import LoRALinear, apply_lora, merge_lora


def synthetic(n: int = 12, T: int = 16, vocab: int = 512, seed: int = 0) -> TokenDataset:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab, (n, T), generator=g)
    labels = torch.roll(inputs, -1, dims=1)
    labels[:, -1] = IGNORE
    labels[::3, :4] = IGNORE  # some masked prompts: uneven trained-token counts per row
    return TokenDataset(inputs, labels, "synthetic", "test")


def trainer(spec="random:tiny-mha", data=None, **kw) -> Trainer:
    kw = {"steps": 4, "lr": 1e-2, "compile": False, **kw}
    return Trainer(load_model(spec, seed=1).model, data or synthetic(), TrainConfig(**kw))


def test_lr_schedule():
    f = [lr_factor(s, warmup=2, total=10, min_ratio=0.1) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(f[2:], f[3:]))  # cosine decay after warmup
    assert math.isclose(f[-1], 0.1)
    assert lr_factor(0, warmup=0, total=1, min_ratio=0.0) == 1.0


def test_grad_accumulation_is_the_same_step():
    """Batch 4 in one micro-step == batch 2 x 2 micro-steps == batch 1 x 4: loss per global batch,
    normalised by its trained tokens."""
    runs = []
    for bs, acc in ((4, 1), (2, 2), (1, 4)):
        t = trainer(batch_size=bs, grad_accum=acc)
        losses = [t.train_step().loss for _ in range(3)]
        runs.append((losses, {n: p.detach().clone() for n, p in t.model.named_parameters()}))
    for losses, params in runs[1:]:
        assert losses == pytest.approx(runs[0][0], rel=1e-5)
        for n, p in params.items():
            # Adam divides by sqrt(v): float noise in near-zero gradients moves a few weights ~lr * 1e-2
            torch.testing.assert_close(p, runs[0][1][n], rtol=1e-4, atol=1e-4)


def test_lora_trains_adapters_only_and_merges():
    base = load_model("random:tiny-gqa", seed=1).model
    t = Trainer(load_model("random:tiny-gqa", seed=1).model, synthetic(),
                TrainConfig(steps=3, lr=1e-2, compile=False, lora_rank=4))
    tokens = synthetic().inputs[:2]
    with torch.no_grad():
        torch.testing.assert_close(t.model(tokens), base(tokens))  # B = 0: starts as the base model
    assert {n.rsplit(".", 1)[-1] for n, p in t.model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    assert sum(isinstance(m, LoRALinear) for m in t.model.modules()) == 4 * 3
    t.fit()
    merged = t.export_model()
    with torch.no_grad():
        adapted = t.model.eval()(tokens)
        assert not torch.allclose(adapted, base(tokens), atol=1e-4)  # training moved it
        torch.testing.assert_close(merged(tokens), adapted, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    for n, p in merged.named_parameters():  # only the adapted projections changed
        if "norm" in n or "embed" in n or "output" in n:
            torch.testing.assert_close(p, dict(base.named_parameters())[n])


def test_lora_errors():
    from fmstack.errors import ParameterError

    model = load_model("random:tiny-mha").model
    with pytest.raises(ParameterError, match="--lora-rank 0 is invalid"):
        apply_lora(model, 0)
    with pytest.raises(ParameterError, match="--lora-rank 100 is too large for layers.0.attn.wqkv"):
        apply_lora(model, 100)
    with pytest.raises(ParameterError, match="--steps 0 is invalid"):
        trainer(steps=0)
    assert merge_lora(model) is model


def test_resume_continues_exactly(tmp_path):
    full = trainer(steps=6, lora_rank=2, save_every=3, warmup=2)
    full_losses = [s.loss for s in full.fit(tmp_path / "a").log]
    first = trainer(steps=6, lora_rank=2, warmup=2)
    for _ in range(3):  # the same run, stopped half-way
        first.train_step()
    first.save_state(tmp_path / "b")
    second = trainer(steps=6, lora_rank=2, warmup=2)
    assert second.load_state(tmp_path / "b") and second.step == 3
    rest = second.fit(tmp_path / "b")
    assert rest.resumed_from == 3 and [s.step for s in rest.log] == [3, 4, 5]
    assert [s.loss for s in rest.log] == pytest.approx(full_losses[3:], rel=1e-6)
    other = trainer(steps=6, lora_rank=4)
    with pytest.raises(Exception, match="written by a different run.*lora_rank: saved 2, now 4"):
        other.load_state(tmp_path / "b")
    assert (tmp_path / "a" / "train_log.jsonl").read_text().count("\n") == 6


def test_memorises_a_token_sequence():
    """A tiny random model trained on one 33-token sequence: the loss falls and greedy decoding from
    its first 3 tokens reproduces the rest."""
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.train.data import _pack

    seq = torch.randint(0, 512, (33,), generator=torch.Generator().manual_seed(5)).tolist()
    data = _pack([(seq, [True] * len(seq))], 32, 0, "seq", "txt")
    t = trainer(steps=80, lr=1e-2, warmup=5, batch_size=1, data=data)
    result = t.fit()
    assert result.first_loss > 5.5 and result.last_loss < 0.1, (result.first_loss, result.last_loss)
    out = Generator(t.export_model(), eos_ids=[]).generate([seq[:3]], SamplingParams(max_new_tokens=30))[0]
    assert out.token_ids == seq[3:]


@pytest.mark.slow
def test_memorises_a_text(tiny_tok_dir, text_file):
    """Full fine-tuning of a tiny model on one short text: the loss falls and greedy decoding from
    its first words reproduces the rest."""
    from fmstack.generation.generate import Generator
    from fmstack.generation.sampling import SamplingParams
    from fmstack.train.data import load_dataset
    from tests.train.conftest import TEXT

    loaded = load_model(str(tiny_tok_dir))
    tok = loaded.tokenizer
    data = load_dataset(text_file, tok, seq_len=64, max_seq_len=128)
    t = Trainer(loaded.model, data, TrainConfig(steps=120, lr=3e-3, warmup=10, batch_size=len(data), compile=False))
    result = t.fit()
    assert result.first_loss > 9 and result.last_loss < 0.05, (result.first_loss, result.last_loss)
    model = t.export_model()
    ids = tok.encode(TEXT)
    out = Generator(model, tok).generate([ids[:6]], SamplingParams(max_new_tokens=len(ids) - 6))[0]
    assert tok.decode(ids[:6] + out.token_ids).startswith(TEXT[:120])


def test_cli_lora_finetune_then_generate(tiny_tok_dir, qa_jsonl, tmp_path, capsys):
    from fmstack.cli import main

    out = tmp_path / "ft"
    common = ["finetune", "--model", str(tiny_tok_dir), "--data", str(qa_jsonl), "--out", str(out), "--lora-rank",
              "8", "--lr", "5e-3", "--batch-size", "4", "--no-compile", "--save-every", "5", "--json"]
    args = [*common, "--steps", "12"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "lora-r8" and summary["steps"] == 12 and summary["data_kind"] == "prompt-completion"
    assert summary["last_loss"] < summary["first_loss"] - 1.0
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 12
    assert (out / STATE_FILE).is_file() and (out / "model.safetensors").is_file()
    assert main(["generate", "--model", str(out), "--max-new-tokens", "4", "--json", "Q: what is 1 plus 2?\nA:"]) == 0
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(gen["token_ids"]) >= 1
    # a second run into the same directory must resume, not overwrite
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main([*common, "--steps", "14", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["resumed_from"] == 12 and resumed["steps"] == 14


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps 0 is invalid"),
    (["--lr", "-1"], "--lr -1.0 is invalid"),
    (["--seq-len", "4096"], r"--seq-len 4096 is invalid: must be in \[1, 128\]"),
    (["--lora-rank", "0"], "--lora-rank 0 is invalid"),
])
def test_cli_errors(tiny_tok_dir, qa_jsonl, tmp_path, capsys, extra, message):
    import re

    from fmstack.cli import main

    rc = main(["finetune", "--model", str(tiny_tok_dir), "--data", str(qa_jsonl), "--out", str(tmp_path / "o"),
               "--no-compile", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err


@pytest.mark.slow
def test_default_model_lora_finetune_lowers_loss_and_generates(qa_jsonl, tmp_path, capsys):
    """The acceptance check: LoRA on SmolLM2-135M-Instruct for a few steps; the output directory generates."""
    from fmstack.cli import main

    out = tmp_path / "smol"
    assert main(["finetune", "--data", str(qa_jsonl), "--out", str(out), "--lora-rank", "8", "--steps", "8",
                 "--lr", "1e-3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["last_loss"] < summary["first_loss"] / 2
    assert main(["generate", "--model", str(out), "--max-new-tokens", "6", "Q: what is 3 plus 4?\nA:"]) == 0
    assert "7" in capsys.readouterr().out
