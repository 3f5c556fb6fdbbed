"""`fmstack.models.build`: meta-device construction, one materialization, tied weights kept tied."""

import torch

from fmstack.config import named_config
from fmstack.models.build import build_meta, build_model, materialize_meta
from fmstack.models.llama import Transformer


def test_build_model_materializes_in_dtype_on_device():
    model = build_model(named_config("tiny-gqa"), "cpu", torch.bfloat16)
    assert isinstance(model, Transformer)
    params = list(model.parameters())
    assert params and all(not p.is_meta and p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params)


def test_tied_embedding_shares_storage_after_materialization():
    model = build_model(named_config("tiny-mha"))  # tie_embeddings=True
    assert model.output.weight is model.embed.weight
    untied = build_model(named_config("tiny-gqa"))
    assert untied.output.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_build_meta_holds_no_storage_and_materialize_meta_fills_only_meta_parameters():
    model = build_meta(named_config("tiny-gqa"), torch.float16)
    assert all(p.is_meta and p.dtype == torch.float16 for p in model.parameters())
    model.norm.weight = torch.nn.Parameter(torch.ones(64, dtype=torch.float16))
    kept = model.norm.weight
    materialize_meta(model.layers[0], torch.device("cpu"))
    assert all(not p.is_meta for p in model.layers[0].parameters())
    assert all(p.is_meta for p in model.layers[1].parameters())  # only the module given
    assert not model.layers[0].attn.wqkv.weight.requires_grad
    materialize_meta(model, torch.device("cpu"))
    assert model.norm.weight is kept and not any(p.is_meta for p in model.parameters())
