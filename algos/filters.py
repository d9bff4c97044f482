"""Group filters and reward shaping: dynamic sampling, DAPO's soft overlong penalty, truncation.

Dynamic sampling rejects groups whose rewards are all equal: their group-relative advantages are
zero, so they cost compute and contribute no gradient. The overlong penalty nudges completions
away from the length limit before they hit it. Truncated-completion masking removes samples
cut off by the limit from the loss, since their reward says nothing about an unfinished answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def informative_groups(rewards: Tensor, tol: float = 0.0) -> Tensor:
    """Bool [num_groups]: True where a group's rewards are not all equal (within `tol`).

    `rewards` [num_groups, group_size]. The batched form of `is_informative`.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    spread = rewards.amax(dim=1) - rewards.amin(dim=1)
    return spread > tol


def is_informative(rewards: Sequence[float] | Tensor, tol: float = 0.0) -> bool:
    """Dynamic sampling: keep a group only if its rewards are not all equal (within `tol`)."""
    values = torch.as_tensor(rewards, dtype=torch.float64).reshape(1, -1)
    if values.numel() == 0:
        return False
    return bool(informative_groups(values, tol)[0])


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong reward term (<= 0) for responses of `lengths` tokens.

    Zero up to `max_tokens - buffer` tokens, then falling linearly to `-penalty` at `max_tokens`
    (and `-penalty` beyond). `buffer == 0` turns it off (all zeros). Add it to the reward.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    if buffer <= 0 or penalty == 0:
        return torch.zeros_like(lengths)
    if buffer > max_tokens:
        raise ValueError(f"overlong buffer ({buffer}) exceeds max_tokens ({max_tokens})")
    over = (lengths - (max_tokens - buffer)).clamp(min=0, max=buffer)
    return -penalty * over / buffer


def drop_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """The loss mask [batch, seq] with every token of truncated samples (`truncated` [batch]) off.

    Used when `algo.mask_truncated` is on: a sample stopped by the length limit keeps its place
    in the batch (and its group's baseline) but gets no gradient.
    """
    keep = ~truncated.to(torch.bool, copy=False).reshape(-1, 1)
    return mask * keep.to(mask.dtype) if mask.dtype != torch.bool else mask & keep
