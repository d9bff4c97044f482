"""What one scheduler step holds while it runs, and how it hears that a group's task ended.

Completion-driven: `StepState.launch` starts a group's task and registers one done-callback on
it, once; the callback reports the run into an `asyncio.Queue`. `completed()` waits for the
queue and drains it, so a wake-up costs O(groups that ended), never O(groups in flight): nothing
is registered again per wake-up (an `asyncio.wait` over every in-flight task would register a
callback on each of them each time, ~490k registrations per step at 4,096 groups in flight).

A batch of runs that ended together is handed back in launch order (the order the scheduler
settles them in, which decides accepted vs surplus among simultaneous completions). A run the
step has already filed (stopped for an interrupt, its task ending later) is skipped: only the
run object the step holds now for that uid counts. `wake()` ends a wait early (an interrupt).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from rollover.rollout.group_run import GroupRun
from rollover.rollout.metrics import StepCounters
from rollover.rollout.types import Group


@dataclass
class StepResult:
    groups: list[Group]  # exactly N, finished and scored
    metrics: dict[str, Any]


@dataclass
class StepState:
    """What one step holds while it runs; every group in here is filed before the step ends."""

    counters: StepCounters
    runs: dict[int, GroupRun] = field(default_factory=dict)  # in flight, in launch order
    accepted: list[Group] = field(default_factory=list)
    surplus: list[Group] = field(default_factory=list)  # accepted beyond N
    retry_later: list[Group] = field(default_factory=list)  # failed; buffered at the end
    rejected: int = 0
    failed: int = 0
    already_finished: set[int] = field(default_factory=set)  # launched finished (surplus before)
    # (launch number, run) per ended task; None: woken for an interrupt
    _ended: asyncio.Queue = field(default_factory=asyncio.Queue)
    _launches: itertools.count = field(default_factory=itertools.count)

    def launch(self, run: GroupRun, work: Coroutine[Any, Any, bool]) -> None:
        """Run `work` (the group's generation and scoring) as `run.task`; report it when it ends."""
        seq = next(self._launches)
        run.task = asyncio.create_task(work)
        run.task.add_done_callback(lambda _task: self._ended.put_nowait((seq, run)))
        self.runs[run.group.uid] = run

    def wake(self) -> None:
        """Make a waiting (or the next) `completed()` return, so the step sees an interrupt."""
        self._ended.put_nowait(None)

    async def completed(self) -> list[GroupRun]:
        """Wait until a task of this step ends (or `wake()`); the runs that ended since the last
        call and are still this step's, in launch order (empty after a bare wake-up)."""
        batch = [await self._ended.get()]
        while not self._ended.empty():
            batch.append(self._ended.get_nowait())
        ended = sorted(item for item in batch if item is not None)
        return [run for _, run in ended if self.runs.get(run.group.uid) is run]
