"""Where each group of a step goes: accepted, surplus, filtered, retried, buffered or dropped.

Part of `AprilScheduler` (a mixin: it reads the scheduler's attributes). `_settle` files one
group whose task ended; `_stop` aborts what still runs and files those groups; `_wind_down`
files everything a step still holds. Every group is filed even when an abort fails or the
step is cancelled, so the ledger's conservation check holds after any step. A failed attempt
(scorer, filter, vLLM's `error`) is retried in a later step, and dropped as `score_error` or
`engine_error` after `max_group_attempts`; see rollout/april.py for when a step stops instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.engine_api import Engine
from rollover.rollout.group_run import ROUTING, SCORING, GroupRun, RequestFailed
from rollover.rollout.ledger import BUFFERED, DROPPED, Ledger
from rollover.rollout.metrics import StepCounters
from rollover.rollout.pool import AllEnginesLost
from rollover.rollout.scoring import KeptScores
from rollover.rollout.step_state import StepState
from rollover.rollout.types import Group

log = logging.getLogger(__name__)

SCORE_ERROR, ENGINE_ERROR = "score_error", "engine_error"


class GroupFiling:
    """Filing groups away for `AprilScheduler` (see the module doc)."""

    engine: Engine
    buffer: PartialBuffer
    ledger: Ledger
    scores: KeptScores
    attempts: Counter
    n_groups: int
    partial: bool
    max_group_attempts: int
    abort_timeout_s: float
    group_filter: Callable[[Group], bool]

    def _settle(self, run: GroupRun, st: StepState) -> None:
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

    def _fail(self, group: Group, reason: str, exc: BaseException, st: StepState) -> None:
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

    async def _wind_down(self, st: StepState, keep_accepted: bool) -> BaseException | None:
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
        abort is returned (the caller raises it once everything is filed). Once per step (or
        interrupt), so its passes over every run are no per-event cost.
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
            if pending:  # only these are still running: one wait over every task is enough
                await asyncio.wait(pending)
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
