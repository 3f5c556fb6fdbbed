"""`fmstack.backends.background`: what the child process of a background compile receives (tensors as
layouts with their dimension marks, inference-ness and parameters kept, no data), and a child that
fails is reported (its log tail, one warning) so the parent compiles the step itself."""

from __future__ import annotations

import functools
import logging
import pickle

import torch
from torch import nn

from fmstack.backends import maybe_mark_dynamic
from fmstack.backends.background import Child, message


def test_tensors_travel_as_layouts_with_their_marks():
    model = nn.Linear(256, 256)
    with torch.inference_mode():
        cache = torch.zeros(4, 8)[:, :6]  # a strided view, an inference tensor
    slots = torch.zeros(2, 5, dtype=torch.long)
    maybe_mark_dynamic(slots, 1)
    data = message(functools.partial(len, "abc"), (model, cache, slots))
    assert len(data) < 4096  # the weights' 65,792 floats are not sent
    recipe, (m, c, s), state = pickle.loads(data)
    assert recipe() == 3 and state["threads"] == torch.get_num_threads()
    assert isinstance(m.weight, nn.Parameter) and m.weight.shape == (256, 256) and m.weight.requires_grad
    assert c.is_inference() and c.shape == (4, 6) and c.stride() == (8, 1)
    assert s.dtype == torch.long and s._dynamo_weak_dynamic_indices == {1}


def test_a_failing_child_is_reported(caplog):
    child = Child("a step", functools.partial(int, "not a number"), ())
    with caplog.at_level(logging.WARNING, logger="fmstack"):
        assert child.wait() is False
    assert "the background compile of a step failed" in caplog.text and "ValueError" in caplog.text
