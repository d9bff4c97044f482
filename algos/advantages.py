"""Group-relative advantages (GRPO and its variants).

Each sample's advantage is its reward minus its group's mean reward, optionally divided by a
standard deviation: the group's own (GRPO), the whole batch's (a steadier scale when some groups
are nearly constant), or none (Dr. GRPO, which drops the std term as a source of bias).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["group", "batch", "none"]


def group_advantages(rewards: Tensor, std: StdMode = "group", eps: float = 1e-6) -> Tensor:
    """Advantages [num_groups, group_size] from rewards of the same shape.

    Centred on each group's mean. `std`: "group" divides by each group's std, "batch" by the std
    of all rewards in the batch, "none" leaves the centred rewards. The std is the sample std
    (n - 1 in the denominator) and `eps` is added to it, so an all-equal group gets zeros, not
    NaN. A group of one sample, or a batch of one reward, has advantage zero.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if std == "none":
        return centred
    if std == "group":
        scale = _sample_std(rewards, dim=1)
    elif std == "batch":
        scale = _sample_std(rewards.reshape(-1), dim=0)
    else:
        raise ValueError(f"unknown advantage std mode {std!r} (expected group, batch or none)")
    return centred / (scale + eps)


def _sample_std(values: Tensor, dim: int) -> Tensor:
    """Sample std along `dim`, kept for broadcasting; zero when there is only one value."""
    if values.shape[dim] < 2:
        return torch.zeros_like(values.select(dim, 0)).unsqueeze(dim)
    return values.std(dim=dim, keepdim=True)
