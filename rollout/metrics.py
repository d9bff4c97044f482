"""Per-step rollout metrics: what the scheduler did and how much of the engine's work was useful."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.types import Group


@dataclass
class StepCounters:
    """Counts accumulated while one step runs."""

    generated_tokens: int = 0  # every token streamed this step, aborted requests included
    requests_submitted: int = 0
    requests_aborted: int = 0  # streams that ended `aborted`
    unasked_aborts: int = 0  # aborts vLLM started itself; the sample was resumed
    budget_exhausted: int = 0  # samples finished as `length` without a request
    groups_drawn: int = 0
    groups_resumed: int = 0
    drops: Counter = field(default_factory=Counter)  # reason -> groups dropped this step
    retries: Counter = field(default_factory=Counter)  # reason -> groups put back to retry later
    migrations: int = 0  # samples moved to another engine after theirs died (engine pool)
    interrupts: int = 0  # times the step stopped its requests for a weight load (running ahead)
    finished_lengths: list[int] = field(default_factory=list)  # response lengths of groups finished now
    filtered_rewards: list[float] = field(default_factory=list)  # rewards of the groups the filter dropped


def token_staleness(groups: list[Group], current_version: int) -> dict[int, int]:
    """Tokens of `groups` counted by age (current version minus the version that sampled them)."""
    versions: Counter = Counter()
    for g in groups:
        for s in g.samples:
            if s.versions and s.versions.count(s.versions[0]) == len(s.versions):
                versions[s.versions[0]] += len(s.versions)  # one version (most samples): no hashing
            else:
                versions.update(s.versions)  # counted in C; ages from the few distinct versions
    return dict(sorted((current_version - v, n) for v, n in versions.items()))


def step_metrics(
    counters: StepCounters,
    returned: list[Group],
    wall_s: float,
    current_version: int,
    buffer: PartialBuffer,
) -> dict[str, Any]:
    """The metrics dict of one step (flat keys, ready for a tracker)."""
    useful = sum(len(s.response_ids) for g in returned for s in g.samples)
    hist = token_staleness(returned, current_version)
    off_policy = sum(n for age, n in hist.items() if age > 0)
    # Every scored sample this step, the filter's drops included: the policy's own success rate,
    # which the batch's `reward` overstates once dynamic sampling keeps only mixed groups.
    scored = [r for g in returned for r in g.rewards] + counters.filtered_rewards
    wall = max(wall_s, 1e-9)
    return {
        "rollout/wall_s": wall_s,
        "rollout/generated_tokens": counters.generated_tokens,
        "rollout/generated_tokens_per_s": counters.generated_tokens / wall,
        "rollout/useful_tokens": useful,
        "rollout/useful_tokens_per_s": useful / wall,
        "rollout/requests_submitted": counters.requests_submitted,
        "rollout/requests_aborted": counters.requests_aborted,
        "rollout/budget_exhausted": counters.budget_exhausted,
        "rollout/unasked_aborts": counters.unasked_aborts,
        "rollout/interrupts": counters.interrupts,
        "rollout/migrations": counters.migrations,
        "rollout/retries": dict(counters.retries),
        "rollout/buffer_size": len(buffer),
        "rollout/buffer_age_hist": buffer.staleness_histogram(current_version),  # groups by age
        "rollout/groups_drawn": counters.groups_drawn,
        "rollout/groups_resumed": counters.groups_resumed,
        "rollout/offpolicy_token_fraction": off_policy / useful if useful else 0.0,
        "rollout/staleness_hist": hist,  # returned tokens by age (versions behind)
        "rollout/filter_drops": counters.drops.get("filtered", 0),
        "rollout/reward_before_filter": sum(scored) / len(scored) if scored else 0.0,
        "rollout/staleness_drops": counters.drops.get("stale", 0),
        "rollout/drops": dict(counters.drops),
        "rollout/policy_version": current_version,
    }
