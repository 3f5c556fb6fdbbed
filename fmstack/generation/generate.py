"""Batched generation over a static KV cache: left-padded prompts, per-row sampling parameters,
per-row stops (EOS, stop strings, max tokens), streaming text with incremental detokenization."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fmstack.errors import ParameterError
from fmstack.generation.kv_cache import StaticKVCache
from fmstack.generation.sampling import SamplingParams, exponential_noise, sample, sampling_tensors

log = logging.getLogger(__name__)

CACHE_LEN_MULTIPLE = 256  # cache lengths are rounded up to this, so nearby requests reuse one cache


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str = ""
    finish_reason: str = "length"  # "length" | "eos" | "stop"
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)  # the first token comes out of the prefill
        return n / self.decode_s if self.decode_s > 0 else 0.0


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8 sequences and any
    tail that could still become a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # full decoded text so far (complete characters only)
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the newly printable text ('' while a character is incomplete)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is still incomplete
        self.text = text
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def flush(self) -> str:
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta


@dataclass
class _Row:
    params: SamplingParams
    prompt_len: int
    detok: IncrementalDetokenizer | None
    result: GenerationResult = field(default_factory=lambda: GenerationResult([]))
    done: bool = False


class Generator:
    """Generates from a `Transformer` with a static KV cache. `_prefill` and `_decode` are the model
    calls; fast paths (torch.compile, CUDA graphs) wrap exactly these two."""

    def __init__(self, model: nn.Module, tokenizer=None, eos_ids: Sequence[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        if eos_ids is None:
            eos_ids = sorted(tokenizer.eos_ids) if tokenizer is not None else []
        self.eos_ids = set(eos_ids)
        self.cache: StaticKVCache | None = None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Floating-point dtype of the cache: the activation dtype (int8 weights still run fp activations).
        if not self.dtype.is_floating_point:
            self.dtype = torch.float32

    # -- model calls -------------------------------------------------------------------------------
    def _prefill(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache) -> Tensor:
        return self.model(tokens, positions, cache, last_only=True)[:, -1]

    def _decode(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache) -> Tensor:
        return self.model(tokens, positions, cache)[:, -1]

    def _sample(self, logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, noise: Tensor) -> Tensor:
        return sample(logits, temperature, top_k, top_p, noise)

    def ensure_cache(self, batch_size: int, seq_len: int) -> StaticKVCache:
        cfg = self.model.config
        if seq_len > cfg.max_seq_len:
            raise ParameterError(
                f"prompt + max_new_tokens = {seq_len} tokens exceeds the model's context length {cfg.max_seq_len}")
        length = min(cfg.max_seq_len, -(-seq_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE)
        c = self.cache
        if c is None or c.batch_size != batch_size or c.max_seq_len < length:
            self.cache = None  # free the old one first
            self.cache = StaticKVCache(cfg, batch_size, length, dtype=self.dtype, device=self.device,
                                       n_kv_heads=self.model.layers[0].attn.n_kv_heads)
        return self.cache

    # -- generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_text: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
        """Generate for each prompt (token ids); `on_text(row, delta)` streams text as it is produced."""
        if not prompts:
            raise ParameterError("prompts must contain at least one prompt")
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ParameterError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ParameterError(f"prompt {i} is empty: at least one token is needed")
            if any((not isinstance(t, int)) or t < 0 or t >= self.model.config.vocab_size for t in p):
                raise ParameterError(f"prompt {i} has token ids outside [0, {self.model.config.vocab_size})")
        need_text = on_text is not None or any(p.stop for p in plist)
        if need_text and self.tokenizer is None:
            raise ParameterError("streaming and stop strings need a tokenizer")
        B, L = len(prompts), max(len(p) for p in prompts)
        max_new = max(p.max_new_tokens for p in plist)
        cache = self.ensure_cache(B, L + max_new)
        rows = [_Row(p, len(ids), IncrementalDetokenizer(self.tokenizer, p.stop) if self.tokenizer else None)
                for p, ids in zip(plist, prompts)]
        dev = self.device
        pad = torch.tensor([L - len(p) for p in prompts], device=dev)
        tokens = torch.tensor([[0] * (L - len(p)) + list(p) for p in prompts], device=dev)
        positions = torch.arange(L, device=dev)[None, :] - pad[:, None]
        temperature, top_k, top_p = sampling_tensors(plist, dev)
        generators = [self._generator(p.seed) for p in plist]
        all_greedy = all(p.greedy for p in plist)

        for r in rows:
            if r.params.max_new_tokens == 0:
                r.done = True
        if all(r.done for r in rows):
            return [r.result for r in rows]

        t0 = time.perf_counter()
        cache.reset(pad)
        logits = self._prefill(tokens, positions, cache)
        next_positions = torch.tensor([len(p) for p in prompts], device=dev)
        step = 0
        t_first = None
        while True:
            noise = (torch.ones_like(logits, dtype=torch.float32) if all_greedy
                     else exponential_noise(tuple(logits.shape), generators, dev))
            next_ids = self._sample(logits, temperature, top_k, top_p, noise)
            ids_host = next_ids.tolist()
            if t_first is None:
                t_first = time.perf_counter()
            step += 1
            for i, (r, tok) in enumerate(zip(rows, ids_host)):
                if not r.done:
                    self._accept(i, r, tok, on_text)
            if all(r.done for r in rows):
                break
            logits = self._decode(next_ids[:, None], (next_positions + step - 1)[:, None], cache)
        t_end = time.perf_counter()
        for r in rows:
            r.result.prefill_s = t_first - t0
            r.result.decode_s = t_end - t_first
        return [r.result for r in rows]

    def _accept(self, i: int, r: _Row, tok: int, on_text: Callable[[int, str], None] | None) -> None:
        res = r.result
        res.token_ids.append(tok)
        if tok in self.eos_ids and not r.params.ignore_eos:  # kept in token_ids, not in text
            r.done, res.finish_reason = True, "eos"
        elif r.detok is not None:
            delta = r.detok.add(tok)
            if on_text and delta:
                on_text(i, delta)
            if r.detok.stopped:
                r.done, res.finish_reason = True, "stop"
        if not r.done and len(res.token_ids) >= r.params.max_new_tokens:
            r.done, res.finish_reason = True, "length"
        if r.done and r.detok is not None:
            tail = r.detok.flush()
            if on_text and tail:
                on_text(i, tail)
            res.text = r.detok.text

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g
