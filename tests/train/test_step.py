"""The training step: loss and gradients against HF transformers, compiled (fullgraph) == eager,
activation checkpointing and LoRA leave the numbers unchanged."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fmstack.checkpoints.base import float_targets
from fmstack.train.data import IGNORE
from fmstack.train.loop import enable_activation_checkpointing, make_loss_fn, token_loss
from fmstack.train.lora import apply_lora
from tests.conftest import hf_and_ours


def batch(vocab: int, B: int = 3, T: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[0, :5] = IGNORE  # a masked prompt
    labels[2, 17:] = IGNORE  # padding
    return tokens, labels


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_loss_and_grads_match_hf(style):
    hf, ours = hf_and_ours(style, seed=3)
    hf.train()
    ours.train().requires_grad_(True)
    tokens, labels = batch(ours.config.vocab_size)
    n = (labels != IGNORE).sum()
    # HF shifts labels itself: its labels[t] is the token at t; ours are already next-token targets
    hf_labels = torch.cat([torch.full((labels.shape[0], 1), IGNORE), labels], dim=1)
    hf_tokens = torch.cat([tokens, torch.zeros_like(tokens[:, :1])], dim=1)
    hf_loss = hf(input_ids=hf_tokens, labels=hf_labels).loss
    hf_loss.backward()
    loss = token_loss(ours(tokens), labels, 1.0 / n.float())
    loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)
    from fmstack.checkpoints.hf import hf_name_to_canonical

    ours_t = float_targets(ours)
    checked = 0
    for name, p in hf.named_parameters():
        canon = hf_name_to_canonical(name)
        if canon is None or canon not in ours_t:
            continue
        dest, row, shape = ours_t[canon]
        g = dest.grad[row:row + shape[0]]
        scale = p.grad.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5 * scale.item(), msg=name)
        checked += 1
    assert checked == len(ours_t)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_step(fn, model, tokens, labels, scale):
    model.zero_grad(set_to_none=True)
    loss = fn(tokens, labels, scale)
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("variant", ["full", "checkpointed-lora"])
def test_compiled_step_equals_eager_without_graph_breaks(variant):
    """fullgraph=True makes any graph break an error; backward is AOTAutograd's one traced graph.
    aot_eager runs exactly those graphs without code generation (inductor: the slow test below)."""
    from fmstack.loading import load_model

    model = load_model("random:tiny-gqa", seed=1).model.train().requires_grad_(True)
    if "lora" in variant:
        apply_lora(model, 4, seed=0)
        with torch.no_grad():  # B starts at zero; give it values so its gradients flow into A too
            for n, p in model.named_parameters():
                if n.endswith("lora_b"):
                    p.normal_(0, 0.05)
    if "checkpointed" in variant:
        enable_activation_checkpointing(model)
    tokens, labels = batch(model.config.vocab_size)
    scale = torch.tensor(1.0 / (labels != IGNORE).sum().item())
    fn = make_loss_fn(model)
    eager_loss, eager_grads = run_step(fn, model, tokens, labels, scale)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")
    for seed in (0, 1):  # a second batch must reuse the graph
        t, lab = batch(model.config.vocab_size, seed=seed)
        loss, g = run_step(compiled, model, t, lab, scale)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["aot_autograd"]["total"] == 1  # one joint forward+backward graph, traced once
    loss, g = run_step(compiled, model, tokens, labels, scale)
    assert set(g) == set(eager_grads) and len(g) == (len(list(model.parameters())) if variant == "full" else 4 * 2 * 3)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for n in g:
        torch.testing.assert_close(g[n], eager_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_keeps_gradients():
    from fmstack.loading import load_model

    tokens, labels = batch(512)
    scale = torch.tensor(0.01)
    out = []
    for ckpt in (False, True):
        model = load_model("random:tiny-mha", seed=2).model.train().requires_grad_(True)
        if ckpt:
            enable_activation_checkpointing(model)
        out.append(run_step(make_loss_fn(model), model, tokens, labels, scale))
    torch.testing.assert_close(out[0][0], out[1][0])
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], msg=n)


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager():
    from fmstack.loading import load_model

    model = load_model("random:tiny-gqa", seed=1).model.train().requires_grad_(True)
    enable_activation_checkpointing(model)
    tokens, labels = batch(model.config.vocab_size)
    scale = torch.tensor(1.0 / (labels != IGNORE).sum().item())
    fn = make_loss_fn(model)
    eager_loss, eager_grads = run_step(fn, model, tokens, labels, scale)
    torch._dynamo.reset()
    counters.clear()
    loss, g = run_step(torch.compile(fn, fullgraph=True, dynamic=False), model, tokens, labels, scale)
    assert dict(counters["graph_break"]) == {}
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for n in g:
        torch.testing.assert_close(g[n], eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)
