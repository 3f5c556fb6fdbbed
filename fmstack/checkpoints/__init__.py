"""Checkpoint readers (GGUF, Meta, HF safetensors, fmstack's own, and generated random weights)
behind one interface: `open_checkpoint(path)` returns a `Checkpoint` whose tensors `load_weights`
streams into a model."""

from fmstack.checkpoints import gguf, hf, meta, native, random_weights
from fmstack.checkpoints.base import (Checkpoint, expected_shapes, is_generated, load_weights, open_checkpoint,
                                      register_reader)
from fmstack.checkpoints.gguf import read_gguf_metadata
from fmstack.checkpoints.hf import hf_name_to_canonical

register_reader("random", random_weights.detect, random_weights.open_random, generated=True)  # first: not a file
register_reader("gguf", gguf.detect, gguf.open_gguf)
register_reader("meta", meta.detect, meta.open_meta)
register_reader("fmstack", native.detect, native.open_native)  # before hf: both have config.json
register_reader("hf", hf.detect, hf.open_hf)

__all__ = ["Checkpoint", "expected_shapes", "hf_name_to_canonical", "is_generated", "load_weights",
           "open_checkpoint", "read_gguf_metadata", "register_reader"]
