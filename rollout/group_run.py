"""Running one group: stream its unfinished samples, then score it once all G are finished.

Kept apart from the scheduler so the per-group rules read in one place:
- a sample resumes from `prompt_ids + response_ids` (token ids, never text) with the remaining
  budget, clamped by the engine's context; no budget left -> finished as `length`, no request;
- every streamed token is appended as it arrives, with its log-prob and policy version, so an
  abort keeps everything generated so far; a request's last chunk restamps all its tokens with
  their exact versions (an in-flight weight load can change the version mid-request), and a
  stream that ends without one (cancelled, failed) drops the tokens whose version it never
  learnt (`TokenChunk.provisional`): the sample resumes from the tokens it is sure of;
- an abort the scheduler did not ask for (vLLM aborted the request itself: a pause, a sleep) is
  resumed at once, from the kept tokens, a few times; a request that ends with vLLM's `error`
  raises `RequestFailed` (the scheduler retries the group in a later step, counted);
- once the scheduler stops the step, a group that finishes generating is not scored now: it is
  buffered and scored when resumed, so no judge holds up the step;
- a pause (`GroupRunner.pause`, a weight load mid-step) aborts every request but keeps the
  groups running: their samples wait at the runner's gate and resubmit from their token ids
  once it reopens, so an interrupt costs the scheduler no re-filing and no new tasks;
- scoring goes through `KeptScores`: one scorer call per group, kept across steps;
- with an engine pool (an engine whose `router()` is not None), a group runs on the member the
  router leases it when it starts (all its samples together), and if that engine dies
  (`EngineLost`) the group moves to another live engine and its samples resume there from the
  tokens they streamed (migration).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollover.rollout.engine_api import Engine, Lease
from rollover.rollout.metrics import StepCounters
from rollover.rollout.remote import EngineLost
from rollover.rollout.scoring import KeptScores, Scorer  # noqa: F401 - Scorer re-exported
from rollover.rollout.settings import SamplingSettings
from rollover.rollout.types import Group, Sample

BudgetFn = Callable[[Group, int], int]  # (group, sample index) -> that sample's max response tokens
RequestIdFn = Callable[[int, int], str]  # (group uid, sample index) -> a request id never used before

# ROUTING: waiting for an engine pool to have a live engine again (a replacement is starting).
GENERATING, ROUTING, SCORING = "generating", "routing", "scoring"
# Resubmissions of one sample after aborts the scheduler did not ask for, per step.
MAX_UNASKED_ABORT_RESUMES = 3
# Moves of one sample to another engine after its engine died, per step.
MAX_MIGRATIONS = 3


class RequestFailed(RuntimeError):
    """vLLM finished a request with `error` (a retryable request-level failure)."""


@dataclass
class GroupRun:
    """One group in flight during one step."""

    group: Group
    phase: str = GENERATING
    request_ids: set[str] = field(default_factory=set)  # submitted, stream not ended yet
    task: asyncio.Task | None = None
    stopping: bool = False  # set by the scheduler before it aborts: no more requests, no scoring
    lease: Lease | None = None  # with a pool: its member and the tokens it may still generate there
    routing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one re-route per engine death
    route_error: BaseException | None = None  # no engine came back: every sample gives up


class GroupRunner:
    """Generates and scores groups against one engine; shared by every group of a step."""

    def __init__(
        self,
        engine: Engine,
        scores: KeptScores,
        sampling: SamplingSettings,
        max_tokens: int,
        request_id: RequestIdFn,
        budget_fn: BudgetFn | None = None,
    ) -> None:
        self.engine = engine
        self.scores = scores
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.request_id = request_id
        self.budget_fn = budget_fn
        self._open = asyncio.Event()  # the gate: cleared while paused, requests wait at it
        self._open.set()
        self.pauses = 0  # pauses so far: an abort seen after one began was the pause's
        self.open_requests = 0  # streams submitted and not ended, over every group
        self._drained = asyncio.Event()  # set while no stream is open
        self._drained.set()

    def pause(self) -> None:
        """Close the gate: no sample submits until `resume`. The caller aborts the requests
        already open and waits for their streams to end (`wait_drained`)."""
        self.pauses += 1
        self._open.clear()

    def resume(self) -> None:
        """Reopen the gate: paused samples resubmit from their tokens."""
        self._open.set()

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no request of this runner is open; False after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def budget(self, group: Group, index: int) -> int:
        """Tokens sample `index` may still generate: its budget and the engine context, >= 0."""
        sample = group.samples[index]
        limit = self.budget_fn(group, index) if self.budget_fn else self.max_tokens
        context_left = self.engine.max_model_len - len(sample.prompt_ids) - len(sample.response_ids)
        return max(0, min(sample.remaining_budget(limit), context_left))

    async def run(self, run: GroupRun, counters: StepCounters) -> bool:
        """Generate, then score. True when the group is finished and scored; False if stopped."""
        group = run.group
        pending = [(i, s) for i, s in enumerate(group.samples) if not s.finished]
        if pending:
            await self._route(run)
            try:
                results = await asyncio.gather(
                    *(self._sample(run, i, s, counters) for i, s in pending),
                    return_exceptions=True,
                )
            finally:
                if run.lease is not None:
                    run.lease.release()
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        if not group.finished or run.stopping:
            return False
        if not group.scored:
            for s in group.samples:
                s.text = self.engine.decode(s.response_ids)
            run.phase = SCORING
            await self.scores.score(group)
        return True

    async def _route(self, run: GroupRun) -> None:
        """Where the group's requests go: a pool's least-loaded live member (leasing the tokens
        its unfinished samples may still generate), else the one engine. With no live member
        the group waits (phase ROUTING) for a replacement: an engine death is no failed attempt."""
        router = self.engine.router()
        if router is None:
            return
        if run.lease is not None:
            run.lease.release()
            run.lease = None
        tokens = sum(self.budget(run.group, i) for i, s in enumerate(run.group.samples) if not s.finished)
        if not router.live:
            run.phase = ROUTING
        try:
            run.lease = await router.acquire(tokens)
        except Exception as exc:
            run.route_error = exc
            raise
        finally:
            run.phase = GENERATING

    def _engine_for(self, run: GroupRun) -> Any:
        return run.lease.member if run.lease is not None else self.engine

    async def _sample(self, run: GroupRun, index: int, sample: Sample, counters: StepCounters) -> None:
        unasked, migrations = 0, 0
        while unasked <= MAX_UNASKED_ABORT_RESUMES:
            if not self._open.is_set():
                await self._open.wait()  # paused: resume from the tokens once the gate reopens
            if run.stopping:
                return
            pauses = self.pauses
            try:
                await self._request(run, index, sample, counters)
            except EngineLost:
                migrations += 1
                if run.stopping or migrations > MAX_MIGRATIONS:
                    raise
                counters.migrations += 1
                async with run.routing:  # the first sample to notice moves the whole group
                    if run.route_error is not None:
                        raise run.route_error
                    if run.lease is None or not run.lease.valid:
                        await self._route(run)
                continue
            if sample.finish_reason == "error":
                sample.finish_reason = "aborted"  # tokens kept; resumable
                raise RequestFailed(f"group {run.group.uid} sample {index}: vLLM finished the request with error")
            if sample.finish_reason != "aborted" or run.stopping:
                return
            if self.pauses != pauses:
                continue  # aborted for a pause: the gate holds it until the pause ends
            unasked += 1
            counters.unasked_aborts += 1  # vLLM aborted it on its own: resume from the tokens

    async def _request(self, run: GroupRun, index: int, sample: Sample, counters: StepCounters) -> None:
        budget = self.budget(run.group, index)
        if budget == 0:
            sample.finish_reason = "length"
            counters.budget_exhausted += 1
            return
        rid = self.request_id(run.group.uid, index)
        run.request_ids.add(rid)
        self.open_requests += 1
        self._drained.clear()
        counters.requests_submitted += 1
        sample.finish_reason = None
        start = settled = len(sample.response_ids)  # this request's tokens; those of known version
        try:
            async for chunk in self._engine_for(run).stream(
                sample.prompt_ids + sample.response_ids, budget, self.sampling, request_id=rid
            ):
                n = len(chunk.token_ids)
                if run.lease is not None:
                    run.lease.use(n)
                sample.response_ids.extend(chunk.token_ids)
                sample.logprobs.extend(chunk.logprobs)
                sample.versions.extend([chunk.version] * n)
                counters.generated_tokens += n
                if chunk.versions is not None:
                    _restamp(sample, start, chunk.versions)
                if chunk.versions is not None or not chunk.provisional:
                    settled = len(sample.response_ids)
                if chunk.finish_reason:
                    sample.finish_reason = chunk.finish_reason
                    counters.requests_aborted += chunk.finish_reason == "aborted"
        finally:
            run.request_ids.discard(rid)  # ended: nothing left to abort (the scheduler aborts the rest)
            self.open_requests -= 1
            if self.open_requests == 0:
                self._drained.set()
            if sample.finish_reason is None:  # cancelled, failed, or the stream ended without a reason
                sample.finish_reason = "aborted"
                counters.requests_aborted += 1
                _drop_from(sample, settled)
            if run.lease is not None and sample.finished:  # stopped short of its budget: the
                run.lease.use(budget - (len(sample.response_ids) - start))  # rest is no load


def _restamp(sample: Sample, start: int, versions: list[int]) -> None:
    """Stamp one request's tokens (from `start` on) with the exact versions its stream reported."""
    if len(versions) != len(sample.response_ids) - start:
        raise RuntimeError(f"the engine reported {len(versions)} token versions for a request "
                           f"that streamed {len(sample.response_ids) - start} tokens")
    sample.versions[start:] = versions


def _drop_from(sample: Sample, keep: int) -> None:
    """Forget the tokens from `keep` on (their policy version is unknown); the sample resumes."""
    del sample.response_ids[keep:], sample.logprobs[keep:], sample.versions[keep:]
