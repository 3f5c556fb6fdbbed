"""Each model kind declares what callers use (`CausalLM`, `StagedCausalLM`) and each parallel plan
is a `ParallelPlan`: checked here on one process (world size 1, no process group is joined: only
construction, which needs none)."""

import pytest
import torch

from fmstack.config import named_config
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.models.build import build_model
from fmstack.models.llama import Transformer
from fmstack.models.protocol import CausalLM, StagedCausalLM
from fmstack.parallel import make_plan
from fmstack.parallel.dist import DistInfo
from fmstack.parallel.pipeline import PipelineModel, StageKVCache
from fmstack.parallel.plan import ParallelPlan
from fmstack.parallel.ring import ContextParallelModel, RingKVCache

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CONFIG = named_config("tiny-gqa")


def _finished(mode: str):
    plan = make_plan(mode, ONE)
    model = plan.build(CONFIG, torch.device("cpu"), torch.float32)
    return plan, plan.finish(model)


def test_transformer_is_a_causal_lm_compiled_whole():
    model = build_model(CONFIG)
    assert isinstance(model, CausalLM) and not isinstance(model, StagedCausalLM)
    assert Transformer.compiles_whole is True
    cache = model.make_cache(2, 32, StaticKVCache, dtype=torch.float16)
    assert type(cache) is StaticKVCache and cache.k_0.shape == (2, CONFIG.n_kv_heads, 32, CONFIG.head_dim)
    assert cache.k_0.dtype == torch.float16


def test_make_cache_uses_the_models_own_kv_heads():
    model = build_model(CONFIG)
    model.layers[0].attn.n_kv_heads = 1  # as a tensor-parallel rank holding one kv head
    assert model.make_cache(1, 16, StaticKVCache).k_0.shape[1] == 1


@pytest.mark.parametrize("mode, kind, cache_kind", [("pp", PipelineModel, StageKVCache),
                                                    ("cp", ContextParallelModel, RingKVCache)])
def test_staged_models_declare_their_compile_and_cache(mode, kind, cache_kind):
    _, model = _finished(mode)
    assert isinstance(model, kind) and isinstance(model, StagedCausalLM) and model.compiles_whole is False
    assert type(model.make_cache(1, 16, StaticKVCache)) is cache_kind  # their own cache, not the static one


@pytest.mark.parametrize("mode", ["tp", "pp", "cp"])
def test_plans_are_parallel_plans(mode):
    plan, model = _finished(mode)
    assert isinstance(plan, ParallelPlan) and isinstance(model, CausalLM)
    w = torch.randn(CONFIG.q_dim, CONFIG.dim)
    assert torch.equal(plan.slice_for("layers.0.attention.wq.weight", w), w)  # one rank keeps everything


def test_plan_quantizer_only_where_the_default_would_differ():
    from fmstack.quant import QuantSpec

    assert make_plan("pp", ONE).quantizer(QuantSpec("int8")) is None
    assert make_plan("cp", ONE).quantizer(QuantSpec("int8")) is None
    tp = make_plan("tp", ONE)
    assert callable(tp.quantizer(QuantSpec("int8"))) and tp.quantizer(QuantSpec("int4")) is None
