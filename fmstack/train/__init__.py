"""Training and fine-tuning: data (`data.py`), LoRA (`lora.py`) and the loop (`loop.py`: AdamW,
warmup + cosine, clipping, activation checkpointing, compiled forward+backward, resumable state,
FSDP2 data parallel under torchrun). `fmstack finetune` is `command.py`."""

from fmstack.train.data import IGNORE, DataError, TokenDataset, load_dataset
from fmstack.train.lora import LoRALinear, apply_lora, merge_lora
from fmstack.train.loop import TrainConfig, Trainer, TrainResult, token_loss

__all__ = ["IGNORE", "DataError", "TokenDataset", "load_dataset", "LoRALinear", "apply_lora", "merge_lora",
           "TrainConfig", "Trainer", "TrainResult", "token_loss"]
