"""The optimizer and learning-rate schedule a run trains with (one place, for the loop and tests).

AdamW keeps its state in the parameters' dtype and updates them in place, so the parameters
must be float32 masters: in bfloat16 an update of lr 1e-6 on a weight of 0.02 is below half a
unit in the last place and rounds to nothing (see trainer/policy.py for the precision policy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rollover.trainer.precision import low_precision

if TYPE_CHECKING:
    from rollover.trainer.config import TrainConfig


def build_optimizer(parameters: list[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over float32 `parameters` (`train.lr`, `train.weight_decay`); refuses low precision."""
    low = low_precision(parameters)
    if low:
        raise ValueError(f"AdamW needs float32 master parameters, got {', '.join(low)}")
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def build_lr_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig):
    """The recipe's schedule (cosine, or constant after warm-up), stepped once per update."""
    from transformers import get_scheduler

    return get_scheduler(
        "cosine" if train.schedule == "cosine" else "constant_with_warmup", optimizer,
        num_warmup_steps=train.warmup_steps * train.updates_per_batch,
        num_training_steps=train.steps * train.updates_per_batch)
