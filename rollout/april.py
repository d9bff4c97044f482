"""The APRIL scheduler: N scored groups per step without waiting for the long tail.

docs/ARCHITECTURE.md, "APRIL semantics", is the specification. Per step:
1. buffered groups older than `max_staleness` versions are dropped (counted);
2. groups are launched until N' = ceil(over_provision * N) are in flight: buffered groups first
   (oldest first), then fresh prompts; one replacement per completed or rejected group;
3. a group that is finished and scored goes through the filter hook: accepted, or dropped as
   `filtered` (and replaced);
4. once N are accepted, every in-flight request is aborted and pending scoring left to finish in
   the background (its result is kept for the group); the streamed tokens stay in the samples,
   and unfinished and surplus groups go to the buffer.

Failures never lose a group and never kill a step on their own: a group whose scorer or filter
raised, whose request vLLM finished with `error`, or that vLLM kept aborting, is put back and
retried in a later step (counted in `rollout/retries`); after `max_group_attempts` failures it is
dropped as `score_error` or `engine_error`. A step stops with one line only when the engine is
dead, an abort fails, or more than `max_failures_per_step` groups fail in one step; every group
is filed (buffer or counted drop) before the error propagates. An engine pool with no live engine
while a replacement starts is no failure: the groups wait for it (`EnginePool.acquire`), and the
step stops (AllEnginesLost, no attempt counted) only if none comes back in time.

Running ahead (`rollout.max_async`; docs/ARCHITECTURE.md, "Pipelined steps"): a step may run
while the trainer updates. `interrupt(action)` then pauses the step's groups in place (their
requests aborted, every token streamed so far kept, their samples held at the runner's gate), runs
`action` (a weight load) on the idle engine, and the samples resubmit from their token ids under
the new version.
A step is told the version its batch will be trained at (`train_version`), so groups whose
oldest token would then be too stale are dropped before it starts. `give_back` returns finished
batches the trainer has not used to the buffer (for a checkpoint between steps).

`partial: false` turns recycling of *unfinished* generations off: those groups are dropped as
`unfinished` (counted). With `over_provision: 1` it never happens: no more than N groups are ever
started, so every group runs to completion (the synchronous baseline, through the same code).
With `partial: false` at most N' groups are started per step (launched + accepted <= N'), since
work beyond that would be thrown away; surplus *finished* groups are still buffered.

The scheduler's parts: this file runs steps and interrupts and holds the state; which group to
start next is rollout/planning.py, where each group goes (settle, stop, file) is
rollout/filing.py, and what a running step holds, with its completion queue, is
rollout/step_state.py. Per event (a group's task ending) the scheduler does O(1) work plus
O(log buffer) per group it starts; its own CPU per step is the metric `rollout/scheduler_cpu_s`
(rollout/cpu_clock.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.config import RolloutConfig
from rollover.rollout.cpu_clock import CpuClock
from rollover.rollout.engine_api import Engine
from rollover.rollout.filing import ENGINE_ERROR, SCORE_ERROR, GroupFiling  # noqa: F401 - re-exported
from rollover.rollout.group_run import BudgetFn, GroupRun, GroupRunner
from rollover.rollout.ledger import BUFFERED, RETURNED, Ledger
from rollover.rollout.metrics import StepCounters, step_metrics
from rollover.rollout.planning import GroupPlanning, PromptItem, PromptSource  # noqa: F401 - re-exported
from rollover.rollout.provision import make_provision
from rollover.rollout.scoring import KeptScores, Scorer, ScoringPool
from rollover.rollout.settings import SamplingSettings
from rollover.rollout.step_state import StepResult, StepState
from rollover.rollout.types import Group
from rollover.tasks.errors import RolloverError

# Tokens per streamed chunk: fewer wake-ups of the scheduler per decode step (frontend CPU);
# an abort still delivers every token the engine produced, so nothing is lost.
STREAM_INTERVAL = 8

log = logging.getLogger(__name__)

GroupFilter = Callable[[Group], bool]  # True: keep the group for training


class RolloutExhausted(RolloverError, RuntimeError):
    """The prompt source ran dry before N groups were accepted (accepted ones are buffered)."""


class StaleEngineError(RolloverError, RuntimeError):
    """The engine serves weights older than the restored checkpoint (load them first)."""


class TooManyRejections(RolloverError, RuntimeError):
    """The filter rejected more groups in one step than `max_rejections_per_step` allows."""


class TooManyFailures(RolloverError, RuntimeError):
    """More groups failed (scorer, filter, engine request) in one step than allowed."""


@dataclass
class _Interrupt:
    """An action to run on an idle engine in the middle of a step, and its outcome."""

    action: Callable[[], Awaitable[Any]]
    done: asyncio.Future


def _accept_all(group: Group) -> bool:
    return True


class AprilScheduler(GroupFiling, GroupPlanning):
    """Produces N groups of G scored samples per `step()`; holds the buffer and the ledger.

    `config` is a `RolloutConfig` (or anything with its attribute names). The trainer injects
    `prompt_source` (fresh prompts with unique uids), `scorer` (fills `Sample.reward`) and
    optionally `group_filter` (dynamic sampling). `sampling` overrides the recipe's sampling
    settings (benchmarks set `ignore_eos`); `budget_fn(group, i)` gives sample i its own token
    budget instead of `max_tokens` (benchmarks replay length profiles with it).
    """

    def __init__(
        self,
        engine: Engine,
        config: RolloutConfig,
        prompt_source: PromptSource,
        scorer: Scorer,
        group_filter: GroupFilter | None = None,
        *,
        max_rejections_per_step: int | None = None,
        max_failures_per_step: int | None = None,
        max_group_attempts: int = 3,
        sampling: SamplingSettings | None = None,
        budget_fn: BudgetFn | None = None,
        scoring_threads: int = 4,
        abort_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.config = config
        self.n_groups = int(config.groups_per_step)
        self.group_size = int(config.group_size)
        self.partial = bool(config.partial)
        self.max_staleness = int(config.max_staleness)
        self.provision = make_provision(config.over_provision, self.n_groups, self.group_size,
                                        int(config.max_tokens), self.max_staleness)
        self.n_in_flight = self.provision.in_flight(PartialBuffer(), 0)  # N', set again each step
        self.group_filter = group_filter or _accept_all
        self._max_rejections, self._max_failures = max_rejections_per_step, max_failures_per_step
        self.max_group_attempts = max_group_attempts
        self.abort_timeout_s = abort_timeout_s
        self._next_prompt = prompt_source if not hasattr(prompt_source, "__next__") else prompt_source.__next__
        # Request ids are unique per scheduler (vLLM aborts every request sharing an id): a
        # random prefix per scheduler, a counter per request.
        self.request_prefix = uuid.uuid4().hex[:8]
        self._request_seq = itertools.count()
        self.pool = ScoringPool(scoring_threads)
        self.scores = KeptScores(scorer, self.pool)
        sampling = sampling or SamplingSettings(
            temperature=config.temperature, top_p=config.top_p, stream_interval=STREAM_INTERVAL
        )
        self.runner = GroupRunner(engine, self.scores, sampling, int(config.max_tokens),
                                  self._request_id, budget_fn)
        self.buffer = PartialBuffer()
        self.ledger = Ledger()
        self.attempts: Counter = Counter()  # uid -> failed attempts so far (scorer, filter, engine)
        self.steps = 0
        self.min_policy_version = 0  # a restored checkpoint's version: the engine must be there
        self.last_metrics: dict[str, Any] = {}
        self._live: StepState | None = None  # the step running now, if any
        self._interrupts: deque[_Interrupt] = deque()
        self._wake = asyncio.Event()  # set when an interrupt waits for the running step
        self._clock = CpuClock()  # the running step's own CPU (paused for interrupt actions)

    @property
    def max_rejections(self) -> int:
        return self._max_rejections or 50 * self.n_in_flight

    @property
    def max_failures(self) -> int:
        return self._max_failures or 2 * self.n_in_flight

    # ---- one step ----------------------------------------------------------------------------

    async def step(self, train_version: int | None = None) -> StepResult:
        """Run until N groups are accepted; return them with this step's metrics.

        `train_version`: the policy version the batch will be trained at (default: the
        engine's); a group whose oldest token would then be more than `max_staleness` versions
        old is dropped as `stale` before the step starts.
        """
        self._clock = clock = CpuClock()
        result = await clock.measure(self._step(train_version))
        # thread_time while this step's own code ran, not its groups' streaming, scoring threads
        # or interrupt actions (rollout/cpu_clock.py says why thread_time and not process_time);
        # the garbage collector's runs in those stretches apart (they follow the whole heap)
        result.metrics["rollout/scheduler_cpu_s"] = clock.seconds
        result.metrics["rollout/scheduler_gc_s"] = clock.gc_seconds
        return result

    async def _step(self, train_version: int | None) -> StepResult:
        started = time.perf_counter()
        version = self.engine.policy_version
        if version < self.min_policy_version:
            raise StaleEngineError(
                f"engine is at policy version {version} but the restored checkpoint is at "
                f"{self.min_policy_version}: load its weights with "
                f"engine.update_weights(weights, version={self.min_policy_version})"
            )
        st = StepState(StepCounters())
        target = version if train_version is None else max(version, int(train_version))
        for g in self.buffer.take_stale(target, self.max_staleness):
            self._drop(g, "stale", st.counters)
        self.n_in_flight = self.provision.in_flight(self.buffer, target)
        self._live = st
        try:
            try:
                exhausted = await self._collect(st)
            except BaseException:
                await self._wind_down(st, keep_accepted=False)
                raise
            try:
                abort_error = await self._wind_down(st, keep_accepted=not exhausted)
            except BaseException:  # stopped (Ctrl-C) while winding down: nothing is returned
                for g in st.accepted:
                    self._to_buffer(g)
                st.accepted = []
                raise
        finally:
            self._live = None
            await self._run_interrupts()  # asked for while the step wound down: the engine is idle
        if abort_error is not None:
            for g in st.accepted:
                self._to_buffer(g)
            raise abort_error
        if exhausted:
            raise RolloutExhausted(
                f"prompt source exhausted with {len(st.accepted)}/{self.n_groups} groups accepted"
            )
        for g in st.accepted:
            self._leave(g, RETURNED)
        self.steps += 1
        self.check_conservation()
        self.provision.observe(st.counters, self.buffer, target)
        self.last_metrics = step_metrics(
            st.counters, st.accepted, time.perf_counter() - started, target, self.buffer
        )
        self.last_metrics["rollout/in_flight_groups"] = self.n_in_flight
        router = self.engine.router()
        if router is not None:  # an engine pool
            self.last_metrics["rollout/engines_live"] = len(router.live)
            self.last_metrics["rollout/engine_revivals"] = router.revivals
        return StepResult(st.accepted, self.last_metrics)

    # ---- running ahead of the trainer ---------------------------------------------------------

    async def interrupt(self, action: Callable[[], Awaitable[Any]]) -> Any:
        """Run `action` (a weight load) with none of this scheduler's requests in flight.

        Between steps it runs at once. During a step, the step's requests are aborted (their
        groups held in place with their tokens), `action` runs, and the groups resume; the
        caller gets `action`'s result or exception either way.
        """
        if self._live is None:
            return await action()
        request = _Interrupt(action, asyncio.get_running_loop().create_future())
        self._interrupts.append(request)
        self._wake.set()
        self._live.wake()
        return await request.done

    async def _run_interrupts(self) -> None:
        """Run the waiting interrupt actions in order; their outcomes go to their callers."""
        self._wake.clear()
        while self._interrupts:
            request = self._interrupts.popleft()
            try:
                request.done.set_result(await self._clock.pause(request.action()))
            except BaseException as exc:  # noqa: BLE001 - the caller of interrupt() gets it
                request.done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    async def _pause_for_interrupts(self, st: StepState) -> None:
        """Pause the step's groups in place, run the interrupt actions, resume them.

        The runner's gate holds every sample while its request is aborted; once no stream is
        open the actions run on the idle engine, and the samples resubmit from their token ids
        under the new version. No group is filed or relaunched, so an interrupt costs the
        scheduler O(requests open), not a second pass through the buffer. If the streams do not
        end within `abort_timeout_s`, the step's groups are stopped and buffered instead (they
        resume from the buffer), as a step's end does.
        """
        st.counters.interrupts += 1
        self.runner.pause()
        try:
            ids = set().union(*(r.request_ids for r in st.runs.values()))
            if ids:
                await self.engine.abort(ids)
            if not await self.runner.wait_drained(self.abort_timeout_s):
                log.warning("requests still open %.0f s after the abort for a weight load: "
                            "stopping the step's groups instead", self.abort_timeout_s)
                self.runner.resume()  # `_stop` marks the runs stopping before it yields: they end at the gate
                abort_error = await self._stop(st.runs, st.counters)
                if abort_error is not None:
                    raise abort_error
            await self._run_interrupts()
        finally:
            self.runner.resume()

    def give_back(self, groups: list[Group]) -> None:
        """A finished step's batch the trainer will not use now goes back to the buffer (scored,
        kept), and the step is uncounted: the next `step()` produces it again."""
        for g in groups:
            self.ledger.move(g.uid, BUFFERED, returned_back=True)
            self.buffer.put(g)
        self.steps -= 1

    async def _collect(self, st: StepState) -> bool:
        """Launch and settle groups until N are accepted; True if the source ran dry first.

        Completion-driven (rollout/step_state.py): each wake-up settles only the groups whose
        tasks ended, so its cost does not grow with the groups in flight."""
        exhausted = False
        while len(st.accepted) < self.n_groups:
            if self._wake.is_set():
                await self._pause_for_interrupts(st)
            while self._may_launch(len(st.runs), len(st.accepted)) and not exhausted:
                group = self._next_group(st.counters)
                if group is None:
                    exhausted = True
                    break
                run = GroupRun(group)
                if group.finished:
                    st.already_finished.add(group.uid)  # its lengths were observed when it finished
                st.launch(run, self.runner.run(run, st.counters))
            if not st.runs:
                return True
            for run in await st.completed():
                self._settle(st.runs.pop(run.group.uid), st)
                if run.group.finished and run.group.uid not in st.already_finished:
                    st.counters.finished_lengths += [len(s.response_ids) for s in run.group.samples]
            if st.rejected > self.max_rejections:
                raise TooManyRejections(
                    f"{st.rejected} groups rejected by the filter in one step "
                    f"(limit {self.max_rejections}); is every reward identical?"
                )
            if st.failed > self.max_failures:
                raise TooManyFailures(
                    f"{st.failed} groups failed in one step (limit {self.max_failures}); "
                    f"retries so far: {dict(st.counters.retries)}; see the warnings above"
                )
        return False

    def state_dict(self) -> dict[str, Any]:
        """Buffer + ledger + policy version + failed attempts, for checkpoints (between steps)."""
        return {
            "format": 1,
            "buffer": self.buffer.state_dict(),
            "ledger": self.ledger.state_dict(),
            "policy_version": self.engine.policy_version,
            "steps": self.steps,
            "attempts": {str(u): n for u, n in self.attempts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore buffer and ledger (between steps); returns the policy version of the saved
        weights, which the engine must then serve (`engine.update_weights(weights, version=...)`,
        or an engine started from the checkpoint with its version set): `step()` refuses to run
        on older weights."""
        self.buffer.load_state_dict(state["buffer"])
        self.ledger.load_state_dict(state["ledger"])
        self.steps = int(state.get("steps", 0))
        self.attempts = Counter({int(u): int(n) for u, n in state.get("attempts", {}).items()})
        self.min_policy_version = int(state["policy_version"])
        self.check_conservation()
        return self.min_policy_version

    def close(self) -> None:
        """Release the scoring pool (scorers still running finish in the background)."""
        self.pool.close()
