"""Rollout that runs ahead of the trainer (`rollout.max_async`; docs/ARCHITECTURE.md, "Pipelined steps").

With `max_async: 0` a batch is rolled out when the trainer asks for it, and the engine idles
while the trainer updates. With `max_async: k > 0` a producer task keeps calling the scheduler's
`step()` while the trainer updates, so up to k finished batches wait for the trainer. When the
trainer's new weights are ready they are loaded at once: with `interrupt: abort` the running
step's requests are stopped (their groups buffered with every token), the weights load, and the
step resumes them from their token ids; with `interrupt: keep` vLLM freezes them in place and
they continue under the new weights. Per-token versions stay exact either way.

Staleness: a batch started while `a` batches are ahead of it (waiting, or being trained) will be
trained `a` versions after the engine's version at its start, so the scheduler is told that
version and drops buffered groups that would then be too old; every token it generates is at
most `a <= max_async <= max_staleness` versions old when trained (the recipe enforces the last).

`settle()` stops running ahead and gives every unfinished and unused group back to the buffer,
so evaluations and checkpoints happen between steps exactly as without the pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from rollover.rollout.april import AprilScheduler, StepResult
from rollover.rollout.engine_api import Engine


class BusyMeter:
    """Seconds some activity was on, read out per window (a trainer step)."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._total = 0.0
        self._taken = 0.0

    def start(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self._total += time.perf_counter() - self._since
            self._since = None

    def take(self) -> float:
        """Busy seconds since the previous `take`, the interval under way included."""
        now = time.perf_counter()
        total = self._total + (now - self._since if self._since is not None else 0.0)
        busy, self._taken = total - self._taken, total
        return busy


class RolloutAhead:
    """Hands the trainer one batch per step; with `max_async > 0` produces them ahead."""

    def __init__(self, scheduler: AprilScheduler, max_async: int, interrupt: str = "abort") -> None:
        self.scheduler = scheduler
        self.max_async = max_async
        self.interrupt_mode = interrupt
        self.ready: deque[StepResult] = deque()
        self.outstanding = 0  # batches handed to the trainer whose weights are not loaded yet
        self._producer: asyncio.Task | None = None
        self._changed = asyncio.Event()  # a batch became ready, or room for one
        self.engine_busy = BusyMeter()  # a rollout step running and no weight load under way
        self._stepping = self._loading = False
        self.trainer_busy = BusyMeter()  # the trainer updating
        self.trainer_wait = BusyMeter()  # the trainer waiting for a batch
        self.engine_wait = BusyMeter()  # the producer waiting for room (k batches ready)
        self._window_started = time.perf_counter()
        self.interrupts = 0

    @property
    def engine(self) -> Engine:
        return self.scheduler.engine

    def train_version(self) -> int:
        """The version the next batch produced will be trained at (at the latest)."""
        return self.engine.policy_version + len(self.ready) + self.outstanding

    # ---- the trainer's side --------------------------------------------------------------------

    async def next_batch(self) -> StepResult:
        """The next batch of N groups, in the order produced."""
        self.trainer_wait.start()
        try:
            if self.max_async == 0:
                result = await self._step()
            else:
                result = await self._take_ready()
        finally:
            self.trainer_wait.stop()
        self.outstanding += 1
        return result

    async def load_weights(self, weights: Any, check: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]) -> None:
        """The trainer is done with its batch: put `weights` into the engine (None when the update
        changed nothing). The one rule for how a load meets the requests running ahead: with
        `interrupt: keep` vLLM freezes them and the load goes in under them; with `abort` the
        running step is interrupted (its samples resume from their token ids) and the load waits
        for an idle engine, as it always does when nothing runs ahead. `check(load)` runs the load
        under the caller's deadline and proves it (rollout/weights/weight_check.py)."""
        try:
            if weights is None:
                return
            engine = self.scheduler.engine
            keep = self.max_async > 0 and self.interrupt_mode == "keep"

            async def load() -> Any:
                if keep:
                    return await engine.update_weights(weights, keep_requests=True)
                await engine.wait_idle()
                return await engine.update_weights(weights)

            self._set(loading=True)
            try:
                if self.max_async == 0 or keep:
                    await check(load)
                else:
                    await self.scheduler.interrupt(lambda: check(load))
            finally:
                self._set(loading=False)
        finally:
            self.outstanding -= 1
            self._changed.set()

    async def settle(self) -> None:
        """Stop running ahead; the running step and unused batches go back to the buffer."""
        producer, self._producer = self._producer, None
        if producer is not None and not producer.done():
            producer.cancel()  # the scheduler files the step's groups in the buffer
        if producer is not None:
            await asyncio.gather(producer, return_exceptions=True)
        self.engine_wait.stop()
        while self.ready:  # newest first, so the buffer's draw order is kept either way
            self.scheduler.give_back(self.ready.pop().groups)
        self.scheduler.check_conservation()

    def start_window(self) -> None:
        """Start measuring afresh (after an evaluation or a save, which are off the clock)."""
        self.window_metrics()

    def window_metrics(self) -> dict[str, float]:
        """Where the time went since the previous call (one trainer step)."""
        now = time.perf_counter()
        wall = max(now - self._window_started, 1e-9)
        self._window_started = now
        interrupts, self.interrupts = self.interrupts, 0
        return {"pipeline/engine_busy": self.engine_busy.take() / wall,
                "pipeline/trainer_busy": self.trainer_busy.take() / wall,
                "pipeline/trainer_wait_s": self.trainer_wait.take(),
                "pipeline/engine_wait_s": self.engine_wait.take(),
                "pipeline/ready_batches": float(len(self.ready)),
                "pipeline/interrupts": float(interrupts)}

    # ---- the producer's side -------------------------------------------------------------------

    def _set(self, *, stepping: bool | None = None, loading: bool | None = None) -> None:
        """Track whether the engine generates: a step is running and no weight load is."""
        self._stepping = self._stepping if stepping is None else stepping
        self._loading = self._loading if loading is None else loading
        if self._stepping and not self._loading:
            self.engine_busy.start()
        else:
            self.engine_busy.stop()

    async def _step(self) -> StepResult:
        self._set(stepping=True)
        try:
            result = await self.scheduler.step(train_version=self.train_version())
        finally:
            self._set(stepping=False)
        self.interrupts += result.metrics.get("rollout/interrupts", 0)
        return result

    async def _take_ready(self) -> StepResult:
        if self._producer is None:
            self._producer = asyncio.create_task(self._produce(), name="rollout-ahead")
        while not self.ready:
            if self._producer.done():  # it failed: its error is the trainer's
                producer, self._producer = self._producer, None
                producer.result()
                raise RuntimeError("rollout producer stopped without a batch")
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait([waiter, self._producer], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        result = self.ready.popleft()
        self._changed.set()
        return result

    async def _produce(self) -> None:
        while True:
            while len(self.ready) >= self.max_async:
                self.engine_wait.start()
                self._changed.clear()
                await self._changed.wait()
                self.engine_wait.stop()
            self.ready.append(await self._step())
            self._changed.set()
