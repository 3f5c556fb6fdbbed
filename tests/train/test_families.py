"""LoRA fine-tuning of every model family: a few steps on tiny random HF models (saved with
`save_pretrained`, as tests/models/test_families.py builds them) lower the loss, the merged checkpoint
reloads to the adapted model's logits, and what LoRA leaves alone stays bit-identical.

What LoRA does with the family-specific parameters: adapters wrap the projections only (`wqkv`, `wo`,
`w_gate_up`, `w_down` when they are `nn.Linear`); everything else is frozen, so Qwen2's q/k/v bias, Qwen3's
q/k `HeadNorm` weights, and Mixtral's router and stacked experts (`ExpertLinear`, not `nn.Linear`)
are not trained, and come out of the merge unchanged. Tolerance on logits: 1e-5 (fp32).
"""

from __future__ import annotations

import pytest
import torch

from fmstack.checkpoints import open_checkpoint
from fmstack.checkpoints.base import load_weights
from fmstack.checkpoints.native import save_checkpoint
from fmstack.loading import load_model
from fmstack.models.build import build_model
from fmstack.train.loop import TrainConfig, Trainer
from fmstack.train.lora import LoRALinear
from tests.models.test_families import FAMILIES, MOE_FAMILIES, hf_family_model
from tests.train.test_loop import synthetic

# family -> the frozen parameters that LoRA must leave as they were (name suffixes)
FROZEN = {"qwen2": ("attn.qkv_bias",), "qwen3": ("attn.q_norm.weight", "attn.k_norm.weight"),
          "granite": ("attn_norm.weight",), "mistral": ("attn_norm.weight",),
          "mixtral": ("mlp.gate.weight", "mlp.w_gate_up.weight", "mlp.w_down.weight")}


def load_hf_dir(path):
    ckpt = open_checkpoint(path)
    model = build_model(ckpt.config)
    load_weights(model, ckpt)
    return model


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_lora_lowers_loss_and_merged_checkpoint_reloads(family, tmp_path):
    hf_family_model(family).save_pretrained(tmp_path / "hf")
    base = load_hf_dir(tmp_path / "hf")
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith(FROZEN[family])}
    assert frozen
    cfg = TrainConfig(steps=10, lr=5e-2, warmup=1, batch_size=2, compile=False, lora_rank=4)
    t = Trainer(load_hf_dir(tmp_path / "hf"), synthetic(n=2, T=16), cfg)  # one batch seen 10 times: a fall is learning
    assert {n.rsplit(".", 1)[-1] for n, p in t.model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    per_layer = 2 if family in MOE_FAMILIES else 4  # MoE: wqkv and wo (the experts are stacked, not Linear)
    assert sum(isinstance(m, LoRALinear) for m in t.model.modules()) == per_layer * base.config.n_layers
    result = t.fit()
    assert result.last_loss < result.first_loss - 0.05, (result.first_loss, result.last_loss)
    out = save_checkpoint(tmp_path / "out", t.export_model())
    reloaded = load_model(str(out)).model.eval()
    tokens = synthetic(n=2, T=20, seed=9).inputs
    with torch.no_grad():
        adapted = t.model.eval()(tokens)
        assert not torch.allclose(adapted, base(tokens), atol=1e-3)  # training moved it
        torch.testing.assert_close(reloaded(tokens), adapted, rtol=1e-5, atol=1e-5)
    params = dict(reloaded.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), name
    assert reloaded.config == base.config
