"""The APRIL scheduler: N scored groups per step without waiting for the long tail.

DESIGN.md, "APRIL semantics", is the specification. Per step:
1. buffered groups older than `max_staleness` versions are dropped (counted);
2. groups are launched until N' = ceil(over_provision * N) are in flight: buffered groups first
   (oldest first), then fresh prompts; one replacement per completed or rejected group;
3. a group that is finished and scored goes through the filter hook: accepted, or dropped as
   `filtered` (and replaced);
4. once N are accepted, every in-flight request is aborted and pending scoring cancelled; the
   streamed tokens stay in the samples, and unfinished and surplus groups go to the buffer.

`partial: false` turns recycling of *unfinished* generations off: those groups are dropped as
`unfinished` (counted). With `over_provision: 1` it never happens: no more than N groups are ever
started, so every group runs to completion (the synchronous baseline, through the same code).
With `partial: false` at most N' groups are started per step (launched + accepted <= N'), since
work beyond that would be thrown away; surplus *finished* groups are still buffered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.engine import SamplingSettings
from rollover.rollout.group_run import SCORING, BudgetFn, GroupRun, GroupRunner, Scorer
from rollover.rollout.ledger import BUFFERED, DROPPED, IN_FLIGHT, RETURNED, Ledger
from rollover.rollout.metrics import StepCounters, step_metrics
from rollover.rollout.types import Group, Sample

log = logging.getLogger(__name__)

# Tokens per streamed chunk: fewer wake-ups of the scheduler per decode step (frontend CPU);
# an abort still delivers every token the engine produced, so nothing is lost.
STREAM_INTERVAL = 8

PromptItem = tuple[int, dict[str, Any], list[int]]  # (uid, task record, prompt token ids)
PromptSource = Callable[[], PromptItem] | Iterator[PromptItem]  # StopIteration: exhausted
GroupFilter = Callable[[Group], bool]  # True: keep the group for training


class RolloutExhausted(RuntimeError):
    """The prompt source ran dry before N groups were accepted (accepted ones are buffered)."""


class StaleEngineError(RuntimeError):
    """The engine serves weights older than the restored checkpoint (load them first)."""


class TooManyRejections(RuntimeError):
    """The filter rejected more groups in one step than `max_rejections_per_step` allows."""


@dataclass
class StepResult:
    groups: list[Group]  # exactly N, finished and scored
    metrics: dict[str, Any]


def _accept_all(group: Group) -> bool:
    return True


class AprilScheduler:
    """Produces N groups of G scored samples per `step()`; holds the buffer and the ledger.

    `config` is a `RolloutConfig` (or anything with its attribute names). The trainer injects
    `prompt_source` (fresh prompts with unique uids), `scorer` (fills `Sample.reward`) and
    optionally `group_filter` (dynamic sampling). `sampling` overrides the recipe's sampling
    settings (benchmarks set `ignore_eos`); `budget_fn(group, i)` gives sample i its own token
    budget instead of `max_tokens` (benchmarks replay length profiles with it).
    """

    def __init__(
        self,
        engine: Any,
        config: Any,
        prompt_source: PromptSource,
        scorer: Scorer,
        group_filter: GroupFilter | None = None,
        *,
        max_rejections_per_step: int | None = None,
        sampling: SamplingSettings | None = None,
        budget_fn: BudgetFn | None = None,
        scoring_threads: int = 4,
        abort_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.config = config
        self.n_groups = int(config.groups_per_step)
        self.group_size = int(config.group_size)
        self.n_in_flight = max(self.n_groups, math.ceil(config.over_provision * self.n_groups))
        self.partial = bool(config.partial)
        self.max_staleness = int(config.max_staleness)
        self.group_filter = group_filter or _accept_all
        self.max_rejections = max_rejections_per_step or 50 * self.n_in_flight
        self.abort_timeout_s = abort_timeout_s
        self._next_prompt = prompt_source if not hasattr(prompt_source, "__next__") else prompt_source.__next__
        self._executor = ThreadPoolExecutor(scoring_threads, thread_name_prefix="rollover-score")
        sampling = sampling or SamplingSettings(
            temperature=config.temperature, top_p=config.top_p, stream_interval=STREAM_INTERVAL
        )
        self.runner = GroupRunner(
            engine, scorer, sampling, int(config.max_tokens), self._executor, budget_fn
        )
        self.buffer = PartialBuffer()
        self.ledger = Ledger()
        self.steps = 0
        self.min_policy_version = 0  # a restored checkpoint's version: the engine must be there
        self.last_metrics: dict[str, Any] = {}

    # ---- one step ----------------------------------------------------------------------------

    async def step(self) -> StepResult:
        """Run until N groups are accepted; return them with this step's metrics."""
        started = time.perf_counter()
        version = self.engine.policy_version
        if version < self.min_policy_version:
            raise StaleEngineError(
                f"engine is at policy version {version} but the restored checkpoint is at "
                f"{self.min_policy_version}: load its weights with "
                f"engine.update_weights(weights, version={self.min_policy_version})"
            )
        counters = StepCounters()
        for g in self.buffer.take_stale(version, self.max_staleness):
            self._drop(g, "stale", counters)
        tag = f"t{self.steps}"
        runs: dict[int, GroupRun] = {}
        accepted: list[Group] = []
        surplus: list[Group] = []
        rejected = 0
        exhausted = False
        try:
            while len(accepted) < self.n_groups:
                while self._may_launch(len(runs), len(accepted)) and not exhausted:
                    group = self._next_group(counters)
                    if group is None:
                        exhausted = True
                        break
                    run = GroupRun(group)
                    run.task = asyncio.create_task(self.runner.run(run, counters, tag))
                    runs[group.uid] = run
                if not runs:
                    break
                done, _ = await asyncio.wait(
                    [r.task for r in runs.values()], return_when=asyncio.FIRST_COMPLETED
                )
                for run in [r for r in runs.values() if r.task in done]:
                    del runs[run.group.uid]
                    verdict = self._judge(run, counters)
                    if verdict == "filtered":
                        rejected += 1
                    elif verdict == "accepted" and len(accepted) < self.n_groups:
                        accepted.append(run.group)
                    elif verdict == "accepted":
                        surplus.append(run.group)
                if rejected > self.max_rejections:
                    raise TooManyRejections(
                        f"{rejected} groups rejected by the filter in one step "
                        f"(limit {self.max_rejections}); is every reward identical?"
                    )
        except BaseException:
            await self._stop(runs, counters)
            for g in accepted + surplus:
                self._to_buffer(g)
            raise
        await self._stop(runs, counters)
        for g in surplus:
            self._to_buffer(g)
        if len(accepted) < self.n_groups:
            for g in accepted:
                self._to_buffer(g)
            raise RolloutExhausted(
                f"prompt source exhausted with {len(accepted)}/{self.n_groups} groups accepted"
            )
        for g in accepted:
            self.ledger.move(g.uid, RETURNED)
        self.steps += 1
        self.check_conservation()
        self.last_metrics = step_metrics(
            counters, accepted, time.perf_counter() - started, version, self.buffer
        )
        return StepResult(accepted, self.last_metrics)

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

    def _judge(self, run: GroupRun, counters: StepCounters) -> str:
        """A completed group task -> "accepted", "filtered" or "dropped" (ledger updated).

        Scorer and filter errors, and a dead engine, are raised after the group is buffered
        (nothing is lost); any other engine error drops just this group, counted.
        """
        group = run.group
        exc = run.task.exception()
        if exc is not None:
            if run.phase == SCORING or self.engine.errored:
                self._to_buffer(group)
                raise exc
            log.warning("group %s failed in the engine: %r; dropped", group.uid, exc)
            self._drop(group, "engine_error", counters)
            return "dropped"
        if not run.task.result():
            self._to_buffer(group)
            raise RuntimeError(f"group {group.uid} ended unfinished before the step ended")
        try:
            keep = self.group_filter(group)
        except BaseException:
            self._to_buffer(group)
            raise
        if not keep:
            self._drop(group, "filtered", counters)
            return "filtered"
        return "accepted"

    async def _stop(self, runs: dict[int, GroupRun], counters: StepCounters) -> None:
        """Abort every in-flight request, cancel pending scoring, and file the groups away."""
        if not runs:
            return
        ids = set().union(*(r.request_ids for r in runs.values()))
        await self.engine.abort(ids)  # streams count their own aborts (finish reason)
        for r in runs.values():
            if r.phase == SCORING:
                r.task.cancel()
        tasks = [r.task for r in runs.values()]
        _, pending = await asyncio.wait(tasks, timeout=self.abort_timeout_s)
        for t in pending:  # cancelling the stream aborts its request too
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs.values():
            g = run.group
            if g.finished or self.partial:
                self._to_buffer(g)
            else:
                self._drop(g, "unfinished", counters)
        runs.clear()

    # ---- bookkeeping -------------------------------------------------------------------------

    def _to_buffer(self, group: Group) -> None:
        self.buffer.put(group)
        self.ledger.move(group.uid, BUFFERED)

    def _drop(self, group: Group, reason: str, counters: StepCounters) -> None:
        self.ledger.move(group.uid, DROPPED, reason)
        counters.drops[reason] += 1

    def check_conservation(self) -> None:
        """Between steps: nothing in flight, and the ledger's buffered set is the buffer."""
        self.ledger.check(in_flight=set(), buffered=self.buffer.uids())

    def state_dict(self) -> dict[str, Any]:
        """Buffer + ledger + policy version, for checkpoints (call between steps)."""
        return {
            "format": 1,
            "buffer": self.buffer.state_dict(),
            "ledger": self.ledger.state_dict(),
            "policy_version": self.engine.policy_version,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore buffer and ledger (between steps). The engine must then serve the
        checkpoint's weights: `engine.update_weights(weights, version=state["policy_version"])`,
        before or after this call; `step()` refuses to run on older weights."""
        self.buffer.load_state_dict(state["buffer"])
        self.ledger.load_state_dict(state["ledger"])
        self.steps = int(state.get("steps", 0))
        self.min_policy_version = int(state["policy_version"])
        self.check_conservation()

    def close(self) -> None:
        """Release the scoring threads (scorers still running finish in the background)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
