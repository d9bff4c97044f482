"""Running one group: stream its unfinished samples, then score it once all G are finished.

Kept apart from the scheduler so the per-group rules read in one place:
- a sample resumes from `prompt_ids + response_ids` (token ids, never text) with the remaining
  budget, clamped by the engine's context; no budget left -> finished as `length`, no request;
- every streamed token is appended as it arrives, with its log-prob and policy version, so an
  abort keeps everything generated so far;
- scoring runs on a copy, off the event loop (thread pool, or awaited if the scorer is async),
  and only a completed scoring writes rewards back: a cancelled one leaves the group unscored.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from rollover.rollout.engine import SamplingSettings
from rollover.rollout.metrics import StepCounters
from rollover.rollout.types import Group, Sample

Scorer = Callable[[Group], Any]  # fills Sample.reward (or returns the G rewards); may be async
BudgetFn = Callable[[Group, int], int]  # (group, sample index) -> that sample's max response tokens

GENERATING, SCORING = "generating", "scoring"


@dataclass
class GroupRun:
    """One group in flight during one step."""

    group: Group
    phase: str = GENERATING
    request_ids: set[str] = field(default_factory=set)
    task: asyncio.Task | None = None


class GroupRunner:
    """Generates and scores groups against one engine; shared by every group of a step."""

    def __init__(
        self,
        engine: Any,
        scorer: Scorer,
        sampling: SamplingSettings,
        max_tokens: int,
        executor: Executor | None,
        budget_fn: BudgetFn | None = None,
    ) -> None:
        self.engine = engine
        self.scorer = scorer
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.executor = executor
        self.budget_fn = budget_fn

    def budget(self, group: Group, index: int) -> int:
        """Tokens sample `index` may still generate: its budget and the engine context, >= 0."""
        sample = group.samples[index]
        limit = self.budget_fn(group, index) if self.budget_fn else self.max_tokens
        context_left = self.engine.max_model_len - len(sample.prompt_ids) - len(sample.response_ids)
        return max(0, min(sample.remaining_budget(limit), context_left))

    async def run(self, run: GroupRun, counters: StepCounters, tag: str) -> bool:
        """Generate, then score. True when the group is finished and scored; False if aborted."""
        group = run.group
        pending = [(i, s) for i, s in enumerate(group.samples) if not s.finished]
        if pending:
            results = await asyncio.gather(
                *(self._sample(run, i, s, counters, tag) for i, s in pending),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        if not group.finished:
            return False
        if not group.scored:
            for s in group.samples:
                s.text = self.engine.decode(s.response_ids)
            run.phase = SCORING
            await self.score(group)
        return True

    async def _sample(
        self, run: GroupRun, index: int, sample: Sample, counters: StepCounters, tag: str
    ) -> None:
        budget = self.budget(run.group, index)
        if budget == 0:
            sample.finish_reason = "length"
            counters.budget_exhausted += 1
            return
        rid = f"g{run.group.uid}-s{index}-{tag}"
        run.request_ids.add(rid)
        counters.requests_submitted += 1
        sample.finish_reason = None
        try:
            async for chunk in self.engine.stream(
                sample.prompt_ids + sample.response_ids, budget, self.sampling, request_id=rid
            ):
                n = len(chunk.token_ids)
                sample.response_ids.extend(chunk.token_ids)
                sample.logprobs.extend(chunk.logprobs)
                sample.versions.extend([chunk.version] * n)
                counters.generated_tokens += n
                if chunk.finish_reason:
                    sample.finish_reason = chunk.finish_reason
                    counters.requests_aborted += chunk.finish_reason == "aborted"
        finally:
            if sample.finish_reason is None:  # cancelled, or the stream ended without a reason
                sample.finish_reason = "aborted"
                counters.requests_aborted += 1

    async def score(self, group: Group) -> None:
        """Score a copy; write rewards (and text) back only if scoring completes."""
        copy = group.clone()
        if inspect.iscoroutinefunction(self.scorer):
            returned = await self.scorer(copy)
        else:
            loop = asyncio.get_running_loop()
            returned = await loop.run_in_executor(self.executor, self.scorer, copy)
        rewards = list(returned) if returned is not None else [s.reward for s in copy.samples]
        if len(rewards) != len(group.samples) or any(r is None for r in rewards):
            raise ValueError(f"scorer left rewards unset for group {group.uid}: {rewards}")
        for s, c, r in zip(group.samples, copy.samples, rewards):
            s.reward = float(r)
            s.text = c.text  # a scorer may re-decode the text its own way
