"""The training loop: next-token loss, AdamW, warmup + cosine schedule, gradient clipping,
activation checkpointing, a compiled forward+backward, resumable checkpoints, and data parallel
(FSDP2, applied by `fmstack.parallel.fsdp`) under torchrun.

Loss normalisation: every step's loss is the sum of token losses over the whole global batch
(all micro-batches, all ranks) divided by its number of trained tokens, so 1 rank with batch 2B
and 2 ranks with batch B (or 1 rank with B and 2 accumulation steps) take the same step.

Compilation: single process, `loss(tokens, labels, scale)` (embedding -> blocks -> logits ->
cross-entropy) is one `torch.compile(fullgraph=True)` graph; AOTAutograd traces its backward as
one graph too. Under FSDP2 each block's forward is compiled (fullgraph) instead, so FSDP's
all-gather/reduce-scatter hooks stay outside the graphs; embedding, head and loss run eagerly.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fmstack.checkpoints.torchfile import first_line, load_torch_file
from fmstack.errors import CheckpointError, FmstackError, ParameterError
from fmstack.models.build import build_model
from fmstack.parallel.fsdp import apply_fsdp
from fmstack.quant import spec_of
from fmstack.train.data import IGNORE, BatchSchedule, TokenDataset
from fmstack.train.lora import apply_lora, has_lora, merge_lora

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
STATE_KEYS = ("model", "optimizer", "scheduler", "step", "fingerprint", "rng")  # what save_state writes
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Hyper-parameters. `batch_size` is per rank and micro-step; global batch = batch_size *
    grad_accum * world size. `lr` None: 2e-4 with LoRA, 2e-5 for full fine-tuning. `warmup` None:
    steps // 10. `save_every` 0: only the end of training writes the resume state."""

    steps: int = 100
    lr: float | None = None
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    activation_checkpointing: bool = False
    compile: bool = True
    compile_backend: str = "inductor"  # tests use "aot_eager": same graphs, no code generation
    save_every: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParameterError(f"--{name.replace('_', '-')} {value} is invalid: must be an integer >= 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ParameterError(f"--lr {self.lr} is invalid: must be a positive number")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ParameterError(f"--warmup {self.warmup} is invalid: must be in [0, --steps {self.steps}]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ParameterError(f"--min-lr-ratio {self.min_lr_ratio} is invalid: must be in [0, 1]")
        if self.weight_decay < 0:
            raise ParameterError(f"--weight-decay {self.weight_decay} is invalid: must be >= 0")
        if not self.max_grad_norm > 0:
            raise ParameterError(f"--max-grad-norm {self.max_grad_norm} is invalid: must be > 0 "
                                 "(use a large value to turn clipping off)")
        if self.save_every < 0:
            raise ParameterError(f"--save-every {self.save_every} is invalid: must be >= 0 (0 = at the end)")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ParameterError(f"--lora-rank {self.lora_rank} is invalid: must be >= 1 (omit it for full "
                                 "fine-tuning)")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora_rank else 2e-5)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else self.steps // 10


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup over `warmup`
    steps, then cosine from 1 down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_loss(logits: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """logits `[B, T, V]`, labels `[B, T]` (IGNORE = no loss), scale 0-d -> scale * sum of token NLLs (fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum") * scale


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (non-reentrant
    `torch.utils.checkpoint`, which torch.compile traces)."""
    for block in model.layers:
        if getattr(block, "_fmstack_inner_forward", None) is None:
            block._fmstack_inner_forward = block.forward
            block.forward = functools.partial(checkpoint, block._fmstack_inner_forward, use_reentrant=False)


def make_loss_fn(model: nn.Module):
    """`loss(tokens [B, T], labels [B, T], scale 0-d) -> 0-d` through the full model."""
    def loss(tokens: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
        return token_loss(model(tokens), labels, scale)
    return loss


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # input positions processed in this step, all ranks
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class TrainResult:
    steps: int
    first_loss: float
    last_loss: float
    log: list[StepLog] = field(default_factory=list)
    resumed_from: int = 0

    def tokens_per_s(self) -> float:
        """Median over the steps of this run after its first (which includes compilation)."""
        rates = sorted(s.tokens_per_s for s in self.log[1:]) or [s.tokens_per_s for s in self.log]
        return rates[len(rates) // 2] if rates else float("nan")


class Trainer:
    """Fine-tunes `model` (a float `Transformer`, as built by `load_model`) on `data`.

    `parallel` "fsdp": this process is one rank of a torchrun job (already joined); the model is
    sharded with FSDP2 and every rank must construct the Trainer with the same arguments."""

    def __init__(self, model: nn.Module, data: TokenDataset, cfg: TrainConfig, device: torch.device | str = "cpu",
                 parallel: str | None = None):
        cfg.check()
        if spec_of(model) is not None:
            raise ParameterError("fine-tuning needs float weights: load the model without --quantize")
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        self.config = model.config
        if parallel not in (None, "none", "fsdp"):
            raise ParameterError(f"--parallel {parallel!r} is not supported for training; choose none or fsdp")
        self.fsdp = parallel == "fsdp"
        if self.fsdp:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        model.train()
        if cfg.lora_rank:
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        else:
            model.requires_grad_(True)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.fsdp:
            apply_fsdp(model, cfg.compile_backend if cfg.compile else None)
            self.loss_fn = make_loss_fn(model)
        else:
            fn = make_loss_fn(model)
            self.loss_fn = (torch.compile(fn, fullgraph=True, dynamic=False, backend=cfg.compile_backend)
                            if cfg.compile else fn)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(0.9, 0.95), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.steps,
                                              min_ratio=cfg.min_lr_ratio))
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        self.batches = BatchSchedule(len(data), self.global_batch, cfg.seed)
        self.step = 0
        self.history: list[StepLog] = []
        n_train = sum(p.numel() for p in self.params)
        log.info("training %s parameters (%s)%s, global batch %d x %d tokens", f"{n_train:,}",
                 f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full",
                 f", FSDP2 over {self.world} ranks" if self.fsdp else "", self.global_batch, data.seq_len)

    # -- one optimizer step -------------------------------------------------------------------------
    def _micro_batches(self, step: int):
        rows = self.batches.rows(step)
        labels = self.data.labels[rows]
        n_target = int((labels != IGNORE).sum())
        scale = torch.tensor(self.world / max(n_target, 1), dtype=torch.float32, device=self.device)
        B = self.cfg.batch_size
        for j in range(self.cfg.grad_accum):
            mine = rows[(j * self.world + self.rank) * B:(j * self.world + self.rank + 1) * B]
            yield (self.data.inputs[mine].to(self.device), self.data.labels[mine].to(self.device), scale)

    def train_step(self) -> StepLog:
        """One optimizer step over one global batch; returns its log (loss averaged over the global batch)."""
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for j, (tokens, labels, scale) in enumerate(self._micro_batches(self.step)):
            if self.fsdp:  # reduce-scatter gradients on the last micro-step only
                self.model.set_requires_gradient_sync(j == self.cfg.grad_accum - 1)
            loss = self.loss_fn(tokens, labels, scale)
            loss.backward()
            total += loss.detach()
        if self.fsdp:
            import torch.distributed as dist

            dist.all_reduce(total)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss_value = total.item() / self.world
        gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        entry = StepLog(self.step, loss_value, lr, float(gn), self.global_batch * self.data.seq_len,
                        time.perf_counter() - t0)
        if not math.isfinite(loss_value):
            raise FmstackError(f"training diverged at step {self.step}: loss is {loss_value} (lower --lr?)")
        self.step += 1
        self.history.append(entry)
        return entry

    def fit(self, out: str | Path | None = None, progress: bool = False) -> TrainResult:
        """Train until `cfg.steps`, appending to OUT/train_log.jsonl and saving resume state every
        `save_every` steps and at the end (when `out` is given)."""
        from tqdm import tqdm

        start = self.step
        bar = tqdm(total=self.cfg.steps, initial=start, disable=not progress or self.rank != 0, desc="finetune",
                   unit="step", dynamic_ncols=True)
        logs: list[StepLog] = []
        if out is not None and self.rank == 0:
            Path(out).mkdir(parents=True, exist_ok=True)
        log_file = open(Path(out) / LOG_FILE, "a") if out is not None and self.rank == 0 else None
        try:
            while self.step < self.cfg.steps:
                entry = self.train_step()
                logs.append(entry)
                bar.set_postfix(loss=f"{entry.loss:.4f}", lr=f"{entry.lr:.2e}", tok_s=f"{entry.tokens_per_s:.0f}")
                bar.update(1)
                if log_file is not None:
                    log_file.write(json.dumps({**asdict(entry), "tokens_per_s": round(entry.tokens_per_s, 2)}) + "\n")
                    log_file.flush()
                done = self.step == self.cfg.steps
                if out is not None and (done or (self.cfg.save_every and self.step % self.cfg.save_every == 0)):
                    self.save_state(out)
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        if not logs:
            raise FmstackError(f"nothing to train: the run is already at step {self.step} of --steps "
                               f"{self.cfg.steps} (raise --steps to continue it)")
        return TrainResult(self.step, logs[0].loss, logs[-1].loss, logs, resumed_from=start)

    # -- resumable state ----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"lora_rank": c.lora_rank, "lora_alpha": c.lora_alpha, "global_batch": self.global_batch,
                "seq_len": self.data.seq_len, "examples": len(self.data), "seed": c.seed,
                "model": self.config.to_dict()}

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if p.requires_grad}

    def save_state(self, out: str | Path) -> None:
        """Trainable weights + optimizer + schedule + step (+ the loss log) to OUT/train_state.pt
        (written atomically; rank 0 writes, all ranks take part in the gather)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            msd, osd = get_state_dict(self.model, self.optimizer, options=opts)
        else:
            names = self._trainable_names()
            msd = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k in names}
            osd = self.optimizer.state_dict()
        if self.rank != 0:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(out) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        torch.save({"model": msd, "optimizer": osd, "scheduler": self.scheduler.state_dict(), "step": self.step,
                    "fingerprint": self._fingerprint(), "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, path)
        log.info("saved resume state at step %d to %s", self.step, path)

    def _read_state(self, path: Path) -> dict:
        """OUT/train_state.pt as saved by `save_state`, or a one-line FmstackError naming the file
        and what is wrong: unreadable (truncated, corrupt), refused as unsafe, or not a state
        written by fine-tuning (missing entries), or written by a different run."""
        try:
            state = load_torch_file(path)
        except CheckpointError as e:
            raise FmstackError(f"--resume: {e}") from None
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise FmstackError(f"--resume: {path} is not a training state written by fmstack finetune "
                               f"(missing {', '.join(missing)}); delete it or choose another --out")
        mine, saved = self._fingerprint(), state["fingerprint"]
        saved = saved if isinstance(saved, dict) else {}
        diff = [k for k in mine if saved.get(k) != mine[k]]
        if diff:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in diff if k != "model")
            raise FmstackError(f"--resume: {path} was written by a different run ({detail or 'model differs'}); "
                               "use the same settings or a new --out")
        return state

    def load_state(self, out: str | Path) -> bool:
        """Resume from OUT/train_state.pt if it exists; False when there is none. Raises when it was
        written by a run with different model, data, batch or LoRA settings, or cannot be used."""
        path = Path(out) / STATE_FILE
        if not path.is_file():
            return False
        state = self._read_state(path)
        try:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"],
                               options=StateDictOptions(full_state_dict=True, strict=False))
            else:
                missing = self._trainable_names() - set(state["model"])
                if missing:
                    raise FmstackError(f"--resume: {path} lacks trainable tensors ({sorted(missing)[:3]}...)")
                self.model.load_state_dict(state["model"], strict=False)
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise FmstackError(f"--resume: {path} does not fit this run's model and optimizer "
                               f"({type(e).__name__}: {first_line(e)})") from None
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # -- export -------------------------------------------------------------------------------------
    def export_model(self) -> nn.Module | None:
        """A plain, merged (LoRA folded in), eval-mode copy of the trained model on CPU: on rank 0; None
        on the other ranks (which still take part in the gather)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.rank != 0:
            return None
        dtype = next(iter(sd.values())).dtype
        plain = build_model(self.config, "cpu", dtype)
        if has_lora(self.model):
            apply_lora(plain, self.cfg.lora_rank, self.cfg.lora_alpha, seed=self.cfg.seed)
        plain.load_state_dict(sd)
        merge_lora(plain)
        return plain.eval().requires_grad_(False)
