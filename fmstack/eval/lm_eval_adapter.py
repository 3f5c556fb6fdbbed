"""EleutherAI lm-evaluation-harness model `fmstack`.

lm-eval (0.4.x) finds models only in its in-process registry and has no plugin entry point, so this
module must be imported before lm-eval looks the name up. Ways to run it:

    python -m fmstack.eval.lm_eval_adapter run --model fmstack --model_args model=smollm2-135m-instruct \
        --tasks hellaswag --device cpu            # lm-eval's own CLI, with `fmstack` registered
    fmstack-lm-eval run --model fmstack ...       # the same, as an installed console script

    import fmstack.eval.lm_eval_adapter, lm_eval  # Python API
    lm_eval.simple_evaluate(model="fmstack", model_args="model=...,batch_size=32", tasks=[...])

model_args: `model` (registry name or checkpoint path), `dtype` (fp32|bf16|fp16), `device`,
`batch_size` (contexts per forward), `max_length` (tokens; default the model's context),
`compile` (torch.compile the scoring forward; default on, off where $FMSTACK_COMPILE=0). `model_args`
win over lm-eval's `--batch_size` and `--device`; lm-eval's `--batch_size` is used when > 1 (its
default 1 and "auto" mean fmstack's default, 32), and its default device `cuda:0` falls back to cpu
on machines without CUDA.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict

import lm_eval.models  # noqa: F401  (built-in models first: lm-eval imports them only into an empty registry)
import torch
from lm_eval.api.model import LM
from lm_eval.api import registry as _registry
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from fmstack.errors import ParameterError
from fmstack.eval.scoring import Scorer, encode_pair
from fmstack.generation.compile import compile_by_default

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


def rolling_requests(ids: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows over `ids` (`ids[0]` the prefix token, never scored): disjoint blocks
    of up to `max_length` scored tokens, each with as much preceding context as fits `max_length`."""
    out = []
    for start in range(1, len(ids), max_length):
        end = min(start + max_length, len(ids))
        out.append((ids[max(0, end - 1 - max_length):start], ids[start:end]))
    return out


class FmstackLM(LM):
    def __init__(self, model: str | None = None, dtype: str = "fp32", device: str | None = None,
                 batch_size: int | str | None = None, max_length: int | None = None,
                 compile: bool | str | None = None, max_batch_size: int | None = None, **unused):
        super().__init__()
        from fmstack.checkpoints.named import DEFAULT_MODEL
        from fmstack.loading import load_model

        if unused:
            log.warning("fmstack: ignoring model_args %s", sorted(unused))
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("fmstack: device %s requested but CUDA is not available; using cpu", device)
            device = "cpu"
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        if not isinstance(batch_size, int) or batch_size <= 1:
            batch_size = DEFAULT_BATCH_SIZE
        self.loaded = load_model(str(model or DEFAULT_MODEL), device=device, dtype=dtype)
        self.tok = self.loaded.tokenizer
        if self.tok is None:
            raise ParameterError(f"model={model}: lm-eval needs a model with a tokenizer")
        self.model = self.loaded.model
        self.max_length = int(max_length or self.loaded.config.max_seq_len)
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.scorer = Scorer(self.model, batch_size=batch_size, max_length=self.max_length,
                             compile=compile_by_default() if compile is None else _flag(compile))
        self._generator = None

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> FmstackLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> FmstackLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- scoring ------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, ctx, cont) for ctx, cont in (r.args for r in requests)]
        self.scorer.progress = not disable_tqdm
        out = [(s.logprob, s.greedy) for s in self.scorer.score(pairs)]
        for r, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
        pairs, owner = [], []
        for i, r in enumerate(requests):
            windows = rolling_requests([prefix, *self.tok.encode(r.args[0], add_bos=False)], self.max_length)
            pairs += windows
            owner += [i] * len(windows)
        self.scorer.progress = not disable_tqdm
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self.scorer.score(pairs)):
            totals[i] += s.logprob
        for r, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
        return totals

    # -- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature) generation until a stop string, EOS or
        max_gen_toks; requests with the same generation kwargs run in batches of `batch_size`."""
        from tqdm import tqdm

        from fmstack.generation.generate import Generator

        if self._generator is None:
            self._generator = Generator(self.model, self.tok)
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_kwargs[repr(sorted(r.args[1].items()))].append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until", leave=False)
        for idx in by_kwargs.values():
            params = self._sampling_params(requests[idx[0]].args[1])
            keep = self.max_length - params.max_new_tokens
            if keep < 1:
                raise ParameterError(f"max_gen_toks={params.max_new_tokens} leaves no room for a prompt "
                                     f"(max_length {self.max_length})")
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                prompts = [self.tok.encode(requests[i].args[0])[-keep:] for i in chunk]
                for i, res in zip(chunk, self._generator.generate(prompts, params)):
                    out[i] = res.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, res.text)
                bar.update(len(chunk))
        bar.close()
        return out

    @staticmethod
    def _sampling_params(gen_kwargs: dict):
        from fmstack.generation.sampling import SamplingParams

        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = next((kw.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kw),
                       DEFAULT_MAX_GEN_TOKS)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        if not _flag(kw.pop("do_sample", temperature > 0)):
            temperature = 0.0
        seed = kw.pop("seed", None)
        return SamplingParams(max_new_tokens=int(max_new), temperature=temperature, top_k=int(kw.pop("top_k", 0) or 0),
                              top_p=float(kw.pop("top_p", 1.0) or 1.0), seed=seed, stop=tuple(s for s in until if s))

    # -- chat templates (--apply_chat_template) -----------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.loaded.source

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


_MODELS = _registry.MODEL_REGISTRY  # the registry (a dict in older lm-eval versions)
if "fmstack" not in _MODELS:  # a second import (python -m runs this file as __main__) keeps the first
    register_model("fmstack")(FmstackLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `fmstack` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
