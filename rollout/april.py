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
while the trainer updates. `interrupt(action)` then aborts the step's in-flight requests (their
groups are buffered with every token streamed so far), runs `action` (a weight load) on the idle
engine, and the step goes on, resuming those groups from their token ids under the new version.
A step is told the version its batch will be trained at (`train_version`), so groups whose
oldest token would then be too stale are dropped before it starts. `give_back` returns finished
batches the trainer has not used to the buffer (for a checkpoint between steps).

`partial: false` turns recycling of *unfinished* generations off: those groups are dropped as
`unfinished` (counted). With `over_provision: 1` it never happens: no more than N groups are ever
started, so every group runs to completion (the synchronous baseline, through the same code).
With `partial: false` at most N' groups are started per step (launched + accepted <= N'), since
work beyond that would be thrown away; surplus *finished* groups are still buffered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.config import RolloutConfig
from rollover.rollout.engine_api import Engine
from rollover.rollout.group_run import ROUTING, SCORING, BudgetFn, GroupRun, GroupRunner, RequestFailed
from rollover.rollout.ledger import BUFFERED, DROPPED, IN_FLIGHT, RETURNED, Ledger
from rollover.rollout.metrics import StepCounters, step_metrics
from rollover.rollout.pool import AllEnginesLost
from rollover.rollout.provision import make_provision
from rollover.rollout.scoring import KeptScores, Scorer, ScoringPool
from rollover.rollout.settings import SamplingSettings
from rollover.rollout.types import Group, Sample
from rollover.tasks.errors import RolloverError

log = logging.getLogger(__name__)

# Tokens per streamed chunk: fewer wake-ups of the scheduler per decode step (frontend CPU);
# an abort still delivers every token the engine produced, so nothing is lost.
STREAM_INTERVAL = 8

PromptItem = tuple[int, dict[str, Any], list[int]]  # (uid, task record, prompt token ids)
PromptSource = Callable[[], PromptItem] | Iterator[PromptItem]  # StopIteration: exhausted
GroupFilter = Callable[[Group], bool]  # True: keep the group for training

SCORE_ERROR, ENGINE_ERROR = "score_error", "engine_error"


class RolloutExhausted(RolloverError, RuntimeError):
    """The prompt source ran dry before N groups were accepted (accepted ones are buffered)."""


class StaleEngineError(RolloverError, RuntimeError):
    """The engine serves weights older than the restored checkpoint (load them first)."""


class TooManyRejections(RolloverError, RuntimeError):
    """The filter rejected more groups in one step than `max_rejections_per_step` allows."""


class TooManyFailures(RolloverError, RuntimeError):
    """More groups failed (scorer, filter, engine request) in one step than allowed."""


@dataclass
class StepResult:
    groups: list[Group]  # exactly N, finished and scored
    metrics: dict[str, Any]


@dataclass
class _Step:
    """What one step holds while it runs; every group in here is filed before the step ends."""

    counters: StepCounters
    runs: dict[int, GroupRun] = field(default_factory=dict)  # in flight
    accepted: list[Group] = field(default_factory=list)
    surplus: list[Group] = field(default_factory=list)  # accepted beyond N
    retry_later: list[Group] = field(default_factory=list)  # failed; buffered at the end
    rejected: int = 0
    failed: int = 0
    already_finished: set[int] = field(default_factory=set)  # launched finished (surplus before)


@dataclass
class _Interrupt:
    """An action to run on an idle engine in the middle of a step, and its outcome."""

    action: Callable[[], Awaitable[Any]]
    done: asyncio.Future


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
        self._live: _Step | None = None  # the step running now, if any
        self._interrupts: deque[_Interrupt] = deque()
        self._wake = asyncio.Event()  # set when an interrupt waits for the running step

    @property
    def max_rejections(self) -> int:
        return self._max_rejections or 50 * self.n_in_flight

    @property
    def max_failures(self) -> int:
        return self._max_failures or 2 * self.n_in_flight

    def _request_id(self, uid: int, index: int) -> str:
        return f"{self.request_prefix}-g{uid}-s{index}-{next(self._request_seq)}"

    # ---- one step ----------------------------------------------------------------------------

    async def step(self, train_version: int | None = None) -> StepResult:
        """Run until N groups are accepted; return them with this step's metrics.

        `train_version`: the policy version the batch will be trained at (default: the
        engine's); a group whose oldest token would then be more than `max_staleness` versions
        old is dropped as `stale` before the step starts.
        """
        started = time.perf_counter()
        version = self.engine.policy_version
        if version < self.min_policy_version:
            raise StaleEngineError(
                f"engine is at policy version {version} but the restored checkpoint is at "
                f"{self.min_policy_version}: load its weights with "
                f"engine.update_weights(weights, version={self.min_policy_version})"
            )
        st = _Step(StepCounters())
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
            abort_error = await self._wind_down(st, keep_accepted=not exhausted)
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
        groups buffered with their tokens), `action` runs, and the step resumes them; the
        caller gets `action`'s result or exception either way.
        """
        if self._live is None:
            return await action()
        request = _Interrupt(action, asyncio.get_running_loop().create_future())
        self._interrupts.append(request)
        self._wake.set()
        return await request.done

    async def _run_interrupts(self) -> None:
        """Run the waiting interrupt actions in order; their outcomes go to their callers."""
        self._wake.clear()
        while self._interrupts:
            request = self._interrupts.popleft()
            try:
                request.done.set_result(await request.action())
            except BaseException as exc:  # noqa: BLE001 - the caller of interrupt() gets it
                request.done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    async def _pause_for_interrupts(self, st: _Step) -> None:
        """Abort the step's requests, buffer their groups, run the interrupt actions."""
        st.counters.interrupts += 1
        abort_error = await self._stop(st.runs, st.counters)
        if abort_error is not None:
            raise abort_error
        await self._run_interrupts()

    def give_back(self, groups: list[Group]) -> None:
        """A finished step's batch the trainer will not use now goes back to the buffer (scored,
        kept), and the step is uncounted: the next `step()` produces it again."""
        for g in groups:
            self.ledger.move(g.uid, BUFFERED, returned_back=True)
            self.buffer.put(g)
        self.steps -= 1

    async def _collect(self, st: _Step) -> bool:
        """Launch and settle groups until N are accepted; True if the source ran dry first."""
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
                run.task = asyncio.create_task(self.runner.run(run, st.counters))
                st.runs[group.uid] = run
            if not st.runs:
                return True
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                done, _ = await asyncio.wait(
                    [r.task for r in st.runs.values()] + [wake], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                wake.cancel()
            for run in [r for r in st.runs.values() if r.task in done]:
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

    def _settle(self, run: GroupRun, st: _Step) -> None:
        """File a completed group task: accepted, surplus, filtered, or failed (retry or drop).

        Raises only when the engine is dead or on a non-Exception (KeyboardInterrupt ...),
        after the group is buffered.
        """
        group, task = run.group, run.task
        if task.cancelled():  # cancelled by someone else: nothing is wrong with the group
            st.retry_later.append(group)
            return
        exc = task.exception()
        if exc is not None:
            if (not isinstance(exc, Exception) or isinstance(exc, AllEnginesLost)
                    or (run.phase != SCORING and self.engine.errored)):
                self._to_buffer(group)
                raise exc
            self._fail(group, SCORE_ERROR if run.phase == SCORING else ENGINE_ERROR, exc, st)
            return
        if not task.result():  # unfinished, yet the step did not stop it: vLLM kept aborting it
            self._fail(group, ENGINE_ERROR, RuntimeError("requests aborted by the engine"), st)
            return
        try:
            keep = self.group_filter(group)
        except Exception as filter_exc:  # noqa: BLE001 - a broken filter is a failed attempt
            self._fail(group, SCORE_ERROR, filter_exc, st)
            return
        if not keep:
            self._drop(group, "filtered", st.counters)
            st.counters.filtered_rewards += group.rewards
            st.rejected += 1
        elif len(st.accepted) < self.n_groups:
            st.accepted.append(group)
        else:
            st.surplus.append(group)

    def _fail(self, group: Group, reason: str, exc: BaseException, st: _Step) -> None:
        """A failed attempt: retry the group in a later step, or drop it after too many."""
        st.failed += 1
        if not self._count_attempt(group, reason, exc, st.counters):
            st.retry_later.append(group)

    def _count_attempt(self, group: Group, reason: str, exc: BaseException, counters: StepCounters) -> bool:
        """Count one failed attempt; True when that was the last allowed (the group is dropped)."""
        self.attempts[group.uid] += 1
        n = self.attempts[group.uid]
        if n >= self.max_group_attempts:
            log.warning("group %s dropped as %s after %d failed attempts: %r", group.uid, reason, n, exc)
            self._drop(group, reason, counters)
            return True
        log.warning("group %s failed (%s, attempt %d of %d): %r; retried later",
                    group.uid, reason, n, self.max_group_attempts, exc)
        counters.retries[reason] += 1
        return False

    async def _wind_down(self, st: _Step, keep_accepted: bool) -> BaseException | None:
        """Stop what runs and file every group of the step; returns an abort failure, if any."""
        try:
            abort_error = await self._stop(st.runs, st.counters)
        finally:
            for g in st.surplus + st.retry_later + ([] if keep_accepted else st.accepted):
                self._to_buffer(g)
            st.surplus, st.retry_later = [], []
            if not keep_accepted:
                st.accepted = []
        return abort_error

    async def _stop(self, runs: dict[int, GroupRun], counters: StepCounters) -> BaseException | None:
        """Abort every in-flight request, stop waiting for scoring, file the groups away.

        Every group is filed even if the abort fails or this coroutine is cancelled; a failed
        abort is returned (the caller raises it once everything is filed).
        """
        if not runs:
            return None
        tasks = [r.task for r in runs.values()]
        abort_error = None
        try:
            for r in runs.values():
                r.stopping = True  # a group finishing from here on is buffered, not scored
            ids = set().union(*(r.request_ids for r in runs.values()))
            try:
                await self.engine.abort(ids)  # streams count their own aborts (finish reason)
            except Exception as exc:  # noqa: BLE001 - cancelling the streams aborts them too
                log.error("abort failed (%r): cancelling the requests instead", exc)
                abort_error = exc
            for r in runs.values():
                if r.phase in (SCORING, ROUTING) or abort_error is not None:
                    # A scorer keeps running (its result is kept for the group); a group waiting
                    # for a replacement engine has nothing to abort.
                    r.task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=self.abort_timeout_s)
            for t in pending:  # cancelling the stream aborts its request too
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for t in tasks:
                t.cancel()  # no-op for finished ones; nothing may keep writing to a filed group
            for run in runs.values():
                g = run.group
                failed = run.task.done() and not run.task.cancelled() and run.task.exception()
                if isinstance(failed, RequestFailed) and self._count_attempt(g, ENGINE_ERROR, failed, counters):
                    continue  # vLLM's error came as the step stopped: it counts all the same
                if g.finished or self.partial:
                    self._to_buffer(g)
                else:
                    self._drop(g, "unfinished", counters)
            runs.clear()
        return abort_error

    # ---- bookkeeping -------------------------------------------------------------------------

    def _to_buffer(self, group: Group) -> None:
        self.buffer.put(group)
        self.ledger.move(group.uid, BUFFERED)

    def _leave(self, group: Group, place: str, reason: str | None = None) -> None:
        """The group leaves for good (returned or dropped): forget its attempts and kept score."""
        self.ledger.move(group.uid, place, reason)
        self.attempts.pop(group.uid, None)
        self.scores.forget(group.uid)

    def _drop(self, group: Group, reason: str, counters: StepCounters) -> None:
        self._leave(group, DROPPED, reason)
        counters.drops[reason] += 1

    def check_conservation(self) -> None:
        """Between steps: nothing in flight, and the ledger's buffered set is the buffer."""
        self.ledger.check(in_flight=set(), buffered=self.buffer.uids())

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
