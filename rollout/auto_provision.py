"""Adaptive over-provisioning (`rollout.over_provision: auto`): N' chosen before every step.

The rule. Let a be the acceptance rate of the dynamic-sampling filter, so `need` = N/a groups
must finish per step. (Finished surplus groups in the buffer are not subtracted: they complete
at once and free their slot, and fewer slots would only lower the batch.) Lengths are response
tokens: L for a sample, L_g = max over its G samples for a group (a group holds its slot until
its slowest sample ends). Each step every in-flight group advances by about the same number of
tokens, the step's *horizon* T. In steady state N' slots finish one group per E[min(L_g, c)]
tokens each (Little's law; c is the staleness cut-off below), so producing `need` groups in a
horizon T takes

    N'(T) = need * E[min(L_g, c)] / (T * P(L_g <= c)),    c = (max_staleness + 1/2) * T.

T is the smallest horizon that satisfies both:
- *busy*: T >= E[L]. At T = E[L] the slots keep need x G sequences decoding on average, the
  batch a tail-free synchronous step would run: a group that waits on one straggler keeps only
  that one sequence busy, so the longer the tail (E[L_g] / E[L]), the more groups in flight.
  With no tail (every L equal) this gives N' = need = N/a: over-provisioning buys nothing.
- *fresh*: a group runs in at most S + 1 steps (S = max_staleness; the first step is half a
  step on average), so one longer than c is dropped as stale with all its tokens. So
  T >= c* / (S + 1/2), where c* is the smallest length with P(L_g > c*) <= `stale_budget`
  (default: 5% of the groups): shorter horizons (more groups) would drop more.

N' is then bounded by KV memory (option `kv_token_capacity`: buffered groups resume first and
are predicted to run to E[L | L > tokens so far], fresh ones to E[L], LightLLM's "past-future"
estimate applied to rollouts) and clamped to [N, max_ratio x N]. Before `min_groups` groups have
been seen finishing, N' = cold_start_ratio x N.

The distributions come from the last `window` steps, corrected for what finishing lengths
alone miss: the long groups are the ones still running (the buffer) or dropped as stale, so
they enter as right-censored observations ("longer than this") in a Kaplan-Meier estimate; mass
beyond the longest observation sits at max_tokens. Heavy stale drops therefore lengthen the
estimated tail: the *fresh* bound takes a longer horizon, and N' falls below the N' that
dropped them. The acceptance rate is N / (N + filtered) over the same window.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.metrics import StepCounters
from rollover.rollout.types import Group

SampleObs = tuple[int, bool]  # (response tokens so far, finished)


# ---- length distributions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Survival:
    """P(L > x) as a step function: `surv[i]` holds on [points[i], points[i+1]); 1 before
    points[0], 0 from `cap` on (every length is at most `cap`)."""

    points: tuple[int, ...]
    surv: tuple[float, ...]
    cap: int

    def tail(self, x: float) -> float:
        """P(L > x)."""
        if x >= self.cap:
            return 0.0
        i = bisect.bisect_right(self.points, x) - 1
        return 1.0 if i < 0 else self.surv[i]

    def capped_mean(self, c: float) -> float:
        """E[min(L, c)] = integral of P(L > x) over [0, c)."""
        c = min(c, self.cap)
        edges = [x for x in self.points if x < c] + [c]
        total, prev, level = 0.0, 0.0, 1.0
        for x, s in zip(edges, (*self.surv, 0.0)):
            total += level * (x - prev)
            prev, level = x, s
        return total

    def mean(self) -> float:
        """E[L]."""
        return self.capped_mean(self.cap)

    def quantile(self, budget: float) -> float:
        """The smallest length c with P(L > c) <= budget."""
        if budget >= 1.0:
            return 0.0
        for x, s in zip(self.points, self.surv):
            if s <= budget:
                return float(x)
        return float(self.cap)

    def mean_above(self, x: float) -> float:
        """E[L | L > x], the predicted final length of a sample already x long."""
        above = self.tail(x)
        if above <= 0.0:
            return float(self.cap)
        return x + (self.mean() - self.capped_mean(x)) / above


def kaplan_meier(obs: Iterable[SampleObs], cap: int) -> Survival:
    """Survival of L from (length, finished) pairs; unfinished ones are right-censored.

    Product-limit estimate: at each finished length x, S *= 1 - (finished at x) / (at risk at x),
    where at risk counts every observation >= x (a censored one at x survives past it).
    """
    obs = sorted((min(n, cap), done) for n, done in obs)
    points, surv, s, i = [], [], 1.0, 0
    while i < len(obs):
        x, j, deaths = obs[i][0], i, 0
        while j < len(obs) and obs[j][0] == x:
            deaths += obs[j][1]
            j += 1
        if deaths:
            s *= 1.0 - deaths / (len(obs) - i)
            points.append(x)
            surv.append(s)
        i = j
    return Survival(tuple(points), tuple(surv), cap)


def group_obs(samples: list[SampleObs]) -> SampleObs:
    """A group's length (its slowest sample) from its samples: censored if any is unfinished."""
    return max(n for n, _ in samples), all(done for _, done in samples)


def sample_obs(group: Group) -> list[SampleObs]:
    """A (buffered) group's samples as observations: finished ones exact, the rest censored."""
    return [(len(s.response_ids), s.finished) for s in group.samples]


def chunk(lengths: list[int], size: int) -> list[list[SampleObs]]:
    """`finished_lengths` (G per finished group, in order) as finished groups."""
    return [[(n, True) for n in lengths[k:k + size]] for k in range(0, len(lengths) - size + 1, size)]


# ---- the rule ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One step's choice and the numbers behind it (for logs and benchmarks)."""

    n_in_flight: int
    need: float  # groups that must finish per step (accepted + rejected): N / acceptance
    horizon: float  # T, tokens each in-flight sample advances per step
    unclamped: float  # N'(T) before the KV bound and the clamp
    kv_limit: int | None
    acceptance: float


def in_flight_for(groups: Survival, samples: Survival, need: float, max_staleness: int,
                  stale_budget: float) -> tuple[float, float]:
    """(N', horizon T) for `need` completions per step; see the module docstring."""
    reach = max_staleness + 0.5  # steps a group gets before it is too stale, on average
    horizon = max(samples.mean(), groups.quantile(stale_budget) / reach, 1.0)
    cut = reach * horizon
    finishing = max(1.0 - groups.tail(cut), 1e-3)
    return need * groups.capped_mean(cut) / (horizon * finishing), horizon


def groups_that_fit(capacity: int, resumed: list[float], fresh: float) -> int:
    """Most groups whose predicted tokens fit `capacity`: `resumed` (the buffer's unfinished
    groups, in resume order) first, then fresh groups of `fresh` tokens each."""
    used = 0.0
    for n, tokens in enumerate(resumed):
        if used + tokens > capacity:
            return n
        used += tokens
    return len(resumed) + int((capacity - used) // max(fresh, 1.0))


@dataclass
class _StepObs:
    """What one step showed, as (length, finished) observations per group."""

    finished: list[list[SampleObs]]  # groups that finished generating
    stale: list[list[SampleObs]] = field(default_factory=list)  # groups dropped as stale
    filtered: int = 0


class AutoProvision:
    """N' from the observed length distribution, acceptance rate, staleness drops and buffer."""

    def __init__(self, groups_per_step: int, group_size: int, max_tokens: int, max_staleness: int,
                 *, kv_token_capacity: int | None = None, stale_budget: float = 0.05,
                 max_ratio: float = 4.0, cold_start_ratio: float = 2.0, window: int = 10,
                 min_groups: int | None = None, min_acceptance: float = 0.1) -> None:
        self.n, self.g = int(groups_per_step), int(group_size)
        self.max_tokens, self.max_staleness = int(max_tokens), int(max_staleness)
        self.kv_token_capacity, self.stale_budget = kv_token_capacity, float(stale_budget)
        self.max_n = max(self.n, math.floor(max_ratio * self.n))
        self.cold_start = max(self.n, math.ceil(cold_start_ratio * self.n))
        self.min_groups = self.n if min_groups is None else int(min_groups)
        self.min_acceptance = float(min_acceptance)
        self.steps: deque[_StepObs] = deque(maxlen=int(window))
        self._seen: dict[int, tuple[int | None, list[SampleObs]]] = {}  # buffer at the last observe
        self._prompt_tokens = 0.0  # mean prompt length seen in the buffer
        self.last_plan: Plan | None = None

    # ---- observations ---------------------------------------------------------------------------

    def observe(self, counters: StepCounters, buffer: PartialBuffer, version: int) -> None:
        """Record the step's finished lengths, filter rejections and stale drops (identified in
        the buffer seen after the previous step), and remember this buffer for the next one."""
        step = _StepObs(chunk(counters.finished_lengths, self.g), filtered=counters.drops.get("filtered", 0))
        n_stale = counters.drops.get("stale", 0)
        gone = sorted((u, s) for u, (v, s) in self._seen.items()
                      if v is not None and version - v > self.max_staleness)
        step.stale = [s for _, s in gone[:n_stale]]
        # Dropped groups this object never saw buffered (a restored checkpoint, batches given
        # back): they ran at least the last plan's cut-off without finishing.
        cut = self._last_cut()
        step.stale += [[(cut, False)] * self.g for _ in range(n_stale - len(step.stale))]
        self.steps.append(step)
        groups = buffer.groups()
        self._seen = {g.uid: (g.oldest_version(), sample_obs(g)) for g in groups}
        prompts = [len(s.prompt_ids) for g in groups for s in g.samples]
        if prompts:
            self._prompt_tokens = sum(prompts) / len(prompts)

    def _last_cut(self) -> int:
        plan = self.last_plan
        if plan is None or math.isnan(plan.horizon):
            return 0
        return round((self.max_staleness + 0.5) * plan.horizon)

    def acceptance(self) -> float:
        """Accepted / (accepted + filtered) over the window: N accepted per observed step."""
        filtered = sum(s.filtered for s in self.steps)
        accepted = self.n * len(self.steps)
        return max(self.min_acceptance, accepted / (accepted + filtered)) if accepted else 1.0

    def survivals(self, buffer: PartialBuffer) -> tuple[Survival, Survival]:
        """(group length, sample length) distributions: finished and stale groups of the window
        plus the buffer's unfinished groups (censored where unfinished)."""
        groups = [g for s in self.steps for g in s.finished + s.stale]
        groups += [sample_obs(g) for g in buffer.groups() if not g.finished]
        return (kaplan_meier((group_obs(g) for g in groups), self.max_tokens),
                kaplan_meier((x for g in groups for x in g), self.max_tokens))

    # ---- the decision ---------------------------------------------------------------------------

    def in_flight(self, buffer: PartialBuffer, version: int) -> int:
        """N' for the step about to run (see the module docstring); also kept in `last_plan`."""
        a = self.acceptance()
        need = self.n / a
        enough = sum(len(s.finished) for s in self.steps) >= self.min_groups
        group_s, sample_s = self.survivals(buffer)
        if enough:
            n, horizon = in_flight_for(group_s, sample_s, need, self.max_staleness, self.stale_budget)
        else:
            n, horizon = float(self.cold_start), float("nan")
        limit = None
        if self.kv_token_capacity is not None:
            limit = self._kv_bound(buffer, sample_s if enough else None)
        bounded = n if limit is None else min(n, limit)
        chosen = max(self.n, min(self.max_n, math.ceil(bounded - 1e-9)))
        self.last_plan = Plan(chosen, need, horizon, n, limit, a)
        return chosen

    def _kv_bound(self, buffer: PartialBuffer, samples: Survival | None) -> int:
        """Groups that fit `kv_token_capacity` when each sample runs to its predicted length
        (max_tokens before any observation)."""
        predict = samples.mean_above if samples else (lambda x: float(self.max_tokens))
        p = self._prompt_tokens
        resumed = [sum(p + predict(n) for n, done in sample_obs(g) if not done)
                   for g in buffer.groups() if not g.finished]
        return groups_that_fit(self.kv_token_capacity, resumed, self.g * (p + predict(0)))
