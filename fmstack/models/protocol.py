"""What callers need from a model (`CausalLM`): `Generator`, the serving engine and the scorers
(HellaSwag, perplexity, lm-eval) use only these members, so the plain `Transformer`, a pipeline
stage (`parallel/pipeline.py`) and a context-parallel model (`parallel/ring.py`) are
interchangeable. A model whose forward holds communication torch.compile cannot trace
(`compiles_whole` False) is also a `StagedCausalLM`: it compiles its traceable part itself.
Conformance of each model kind is checked in `tests/models/test_protocol.py`."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from torch import Tensor, nn

from fmstack.config import ModelConfig
from fmstack.models.llama import AttentionCache

# `static(config, batch_size, max_seq_len, n_kv_heads=..., **kw)`: the caller's standard static KV
# cache class (`fmstack.generation.kv_cache.StaticKVCache`), passed in because models sit below it.
StaticCacheFactory = Callable[..., AttentionCache]


@runtime_checkable
class CausalLM(Protocol):
    config: ModelConfig
    compiles_whole: bool  # torch.compile(fullgraph=True) can trace `forward` as one graph
    output: nn.Module  # the LM head (`output.weight.shape[0]` is the vocabulary the logits cover)

    def __call__(self, tokens: Tensor, positions: Tensor | None = None, cache: AttentionCache | None = None,
                 last_only: bool = False) -> Tensor:
        """tokens `[B, T]` -> logits `[B, T, V]` (`[B, 1, V]` with last_only), the same on every rank."""
        ...

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None,
                      cache: AttentionCache | None = None) -> Tensor:
        """tokens `[B, T]` -> final normed hidden states `[B, T, dim]` (the scoring path)."""
        ...

    def make_cache(self, batch_size: int, max_seq_len: int, static: StaticCacheFactory, **kw) -> AttentionCache:
        """A generation KV cache for this model (`kw`: dtype, device). A model whose layers all run
        here returns `static(...)` sized for them (tensor parallel: its own kv heads); pipeline stages
        and context parallel build their own kind and ignore `static`."""
        ...


@runtime_checkable
class StagedCausalLM(CausalLM, Protocol):
    """A `CausalLM` with `compiles_whole` False."""

    def compile_stage(self) -> None:
        """Compile, in place, the part of the forward torch.compile can trace (or say why none)."""
        ...
