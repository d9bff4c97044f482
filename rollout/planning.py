"""Which group the scheduler starts next, and whether it may start one (part of `AprilScheduler`).

Buffered groups come first, oldest (lowest uid) first, then fresh prompts; a fresh prompt the
engine cannot hold, or an empty one, is dropped with its reason and the next one drawn. Every
choice is O(log buffer) (`PartialBuffer.pop_oldest`) and touches no other group. Request ids are
unique per scheduler (vLLM aborts every request sharing an id): a random prefix per scheduler,
a counter per request.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.engine_api import Engine
from rollover.rollout.ledger import IN_FLIGHT, Ledger
from rollover.rollout.metrics import StepCounters
from rollover.rollout.types import Group, Sample

log = logging.getLogger(__name__)

PromptItem = tuple[int, dict[str, Any], list[int]]  # (uid, task record, prompt token ids)
PromptSource = Callable[[], PromptItem] | Iterator[PromptItem]  # StopIteration: exhausted


class GroupPlanning:
    """The launch rules of `AprilScheduler` (a mixin: it reads the scheduler's attributes)."""

    engine: Engine
    buffer: PartialBuffer
    ledger: Ledger
    group_size: int
    partial: bool
    n_in_flight: int
    request_prefix: str
    _request_seq: itertools.count
    _next_prompt: Callable[[], PromptItem]
    _drop: Callable[[Group, str, StepCounters], None]  # GroupFiling's

    def _request_id(self, uid: int, index: int) -> str:
        return f"{self.request_prefix}-g{uid}-s{index}-{next(self._request_seq)}"

    def _may_launch(self, in_flight: int, accepted: int) -> bool:
        if self.partial:
            return in_flight < self.n_in_flight
        return in_flight + accepted < self.n_in_flight  # no work that would be thrown away

    def _next_group(self, counters: StepCounters) -> Group | None:
        """The oldest buffered group, else a fresh prompt; None when the source is exhausted."""
        while True:
            group = self.buffer.pop_oldest()
            if group is not None:
                self.ledger.move(group.uid, IN_FLIGHT)
                counters.groups_resumed += 1
                return group
            try:
                uid, task, prompt_ids = self._next_prompt()
            except StopIteration:
                return None
            self.ledger.draw(uid)
            counters.groups_drawn += 1
            group = Group(uid, task, [Sample(list(prompt_ids)) for _ in range(self.group_size)])
            if len(prompt_ids) >= self.engine.max_model_len:
                log.warning("prompt %s has %d tokens, engine context is %d: dropped",
                            uid, len(prompt_ids), self.engine.max_model_len)
                self._drop(group, "prompt_too_long", counters)
                continue
            if not prompt_ids:
                self._drop(group, "empty_prompt", counters)
                continue
            return group
