"""How many groups the scheduler keeps in flight (N') each step.

`FixedProvision` is the APRIL paper's rule: N' = ceil(over_provision x N). `AutoProvision`
(`rollout.over_provision: auto`) chooses N' each step from what earlier steps showed.
Both are fed the same observations after every step and asked for N' before the next one.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.metrics import StepCounters


class Provision(Protocol):
    def in_flight(self, buffer: PartialBuffer, version: int) -> int:
        """N' for the next step (>= N)."""

    def observe(self, counters: StepCounters, buffer: PartialBuffer, version: int) -> None:
        """What the step just finished showed (completion lengths, drops, the buffer)."""


class FixedProvision:
    """N' = ceil(ratio x N), every step."""

    def __init__(self, ratio: float, groups_per_step: int) -> None:
        self.n_in_flight = max(groups_per_step, math.ceil(ratio * groups_per_step))

    def in_flight(self, buffer: PartialBuffer, version: int) -> int:
        return self.n_in_flight

    def observe(self, counters: StepCounters, buffer: PartialBuffer, version: int) -> None:
        pass


def make_provision(over_provision: float | str, groups_per_step: int, group_size: int,
                   max_tokens: int, max_staleness: int, **options: Any) -> Provision:
    """The provisioning rule a recipe's `rollout.over_provision` names."""
    if over_provision == "auto":
        from rollover.rollout.auto_provision import AutoProvision

        return AutoProvision(groups_per_step, group_size, max_tokens, max_staleness, **options)
    return FixedProvision(float(over_provision), groups_per_step)
