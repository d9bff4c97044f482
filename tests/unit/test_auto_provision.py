"""`over_provision: auto` (rollout/auto_provision.py) on synthetic observations; expected N'
values are worked out by hand in each test from the rule in the module docstring:

    T = max(E[L], c* / (S + 1/2)),  c = (S + 1/2) T,  N' = need E[min(L_g, c)] / (T P(L_g <= c)),

need = N / acceptance, c* = the smallest group length with P(L_g > c*) <= 0.05, then N' is
rounded up and clamped to [N, 4N]."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

from rollover.rollout.april import AprilScheduler
from rollover.rollout.auto_provision import AutoProvision, groups_that_fit, kaplan_meier
from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.engine import TokenChunk
from rollover.rollout.engine_api import SingleEngine
from rollover.rollout.metrics import StepCounters
from rollover.rollout.provision import make_provision
from rollover.rollout.types import Group, Sample

EMPTY = PartialBuffer()


def counters(groups: list[list[int]], stale: int = 0, filtered: int = 0) -> StepCounters:
    """A step in which `groups` (response lengths per sample) finished generating."""
    c = StepCounters(finished_lengths=[n for g in groups for n in g])
    c.drops = Counter({k: v for k, v in (("stale", stale), ("filtered", filtered)) if v})
    return c


def partial(uid: int, lengths: list[int], finished: list[bool], version: int) -> Group:
    samples = [Sample([1, 2], response_ids=[7] * n, versions=[version] * n,
                      finish_reason="stop" if done else "aborted")
               for n, done in zip(lengths, finished)]
    return Group(uid, {}, samples)


def buffer_of(*groups: Group) -> PartialBuffer:
    buf = PartialBuffer()
    for g in groups:
        buf.put(g)
    return buf


# ---- the length distribution -----------------------------------------------------------------


def test_kaplan_meier_by_hand():
    # lengths 2, 5, 5 finished; 3 and 8 still running (censored); nothing exceeds 10
    s = kaplan_meier([(2, True), (3, False), (5, True), (5, True), (8, False)], cap=10)
    # at 2: 5 at risk, 1 ends -> 4/5; at 5: 3 at risk (5, 5, 8), 2 end -> 4/5 * 1/3 = 4/15
    assert s.points == (2, 5) and s.surv == pytest.approx((0.8, 4 / 15))
    assert [s.tail(x) for x in (1, 4, 5, 9, 10)] == pytest.approx([1, 0.8, 4 / 15, 4 / 15, 0])
    # E[L] = 2 * 1 + 3 * 0.8 + 5 * 4/15 (the unseen tail sits at the cap, 10)
    assert s.mean() == pytest.approx(2 + 2.4 + 4 / 3)
    assert s.capped_mean(5) == pytest.approx(4.4)
    assert s.quantile(0.5) == 5 and s.quantile(0.1) == 10
    assert s.mean_above(5) == pytest.approx(10)  # only the tail at the cap is longer than 5


def test_groups_that_fit_resumes_buffered_first():
    assert groups_that_fit(100, [], 30) == 3
    assert groups_that_fit(100, [50, 40], 30) == 2  # 90 used, 10 left: no fresh group fits
    assert groups_that_fit(100, [50, 60], 30) == 1


# ---- the rule ------------------------------------------------------------------------------------


def test_cold_start_is_twice_n_and_kv_bounded():
    assert AutoProvision(8, 4, 100, 2).in_flight(EMPTY, 0) == 16
    assert AutoProvision(8, 4, 100, 2, cold_start_ratio=9).in_flight(EMPTY, 0) == 32  # max 4N
    # before any observation a sample is assumed to run to max_tokens: 2 x 100 tokens a group
    assert AutoProvision(4, 2, 100, 2, kv_token_capacity=1000).in_flight(EMPTY, 0) == 5


def test_no_tail_runs_n_over_acceptance():
    # every length 20: E[L] = E[L_g] = 20, c* = 20, T = max(20, 20/4.5) = 20, c = 90 -> N' = need
    p = AutoProvision(7, 4, 100, 4)
    p.observe(counters([[20] * 4] * 7), EMPTY, 0)
    assert p.in_flight(EMPTY, 1) == 7
    # 3 of every 10 finished groups rejected: acceptance 7 / (7 + 3) = 0.7, N' = 7 / 0.7 = 10
    q = AutoProvision(7, 4, 100, 4)
    for v in range(3):
        q.observe(counters([[20] * 4] * 10, filtered=3), EMPTY, v)
    assert q.acceptance() == pytest.approx(0.7)
    assert q.in_flight(EMPTY, 3) == 10


def test_long_tail_runs_more_groups():
    # half the groups wait on one straggler of 40: samples 3/4 at 10, 1/4 at 40 -> E[L] = 17.5;
    # groups half 10, half 40 -> E[L_g] = 25; c* = 40, T = max(17.5, 40/4.5) = 17.5, c = 78.75
    # -> N' = 7 x 25 / 17.5 = 10 (with no tail the same N would run 7)
    hist = [[10, 10]] * 4 + [[10, 40]] * 4
    p = AutoProvision(7, 2, 100, 4)
    p.observe(counters(hist), EMPTY, 0)
    assert p.in_flight(EMPTY, 1) == 10
    assert p.last_plan.horizon == pytest.approx(17.5)
    # and with 30% rejected: need 10 -> N' = 10 x 25 / 17.5 = 14.3 -> 15
    q = AutoProvision(7, 2, 100, 4)
    q.observe(counters(hist * 2, filtered=3), EMPTY, 0)
    assert q.in_flight(EMPTY, 1) == 15


def test_less_staleness_allowed_fewer_groups():
    # half the groups (10, 10, 10, 10), half (10, 10, 10, 90): E[L] = 20, E[L_g] = 50, c* = 90
    hist = [[10, 10, 10, 10], [10, 10, 10, 90]] * 9
    chosen = {}
    for s in (4, 2, 0):
        p = AutoProvision(18, 4, 1000, s)
        p.observe(counters(hist), EMPTY, 0)
        chosen[s] = p.in_flight(EMPTY, 1)
    # S=4: T = max(20, 90/4.5 = 20) = 20, c = 90 -> 18 x 50 / 20 = 45 (the busy rule decides)
    # S=2: T = 90/2.5 = 36, c = 90 -> 18 x 50 / 36 = 25 (staleness decides)
    # S=0: T = 90/0.5 = 180 -> 18 x 50 / 180 = 5 -> clamped to N = 18
    assert chosen == {4: 45, 2: 25, 0: 18}


def test_heavy_stale_drops_shrink_n():
    # cold start at 4N = 16 in flight; the step left 4 long groups in the buffer (one sample 60
    # tokens in, unfinished) whose tokens are from version 0; at version 5 they are too stale.
    p = AutoProvision(4, 2, 1000, 4, cold_start_ratio=4)
    assert p.in_flight(EMPTY, 4) == 16
    long_ones = [partial(100 + i, [10, 60], [True, False], version=0) for i in range(4)]
    p.observe(counters([[10, 10]] * 4), buffer_of(*long_ones), 4)
    p.observe(counters([[10, 10]] * 4, stale=4), EMPTY, 5)
    # groups: 8 ended at 10, 4 dropped while longer than 60 (censored): P(L_g > 10) = 4/12,
    # nothing seen beyond 60 so that third sits at max_tokens = 1000: c* = 1000, T = 1000/4.5;
    # E[min(L_g, 1000)] = 10 + 990/3 = 340 -> N' = 4 x 340 / 222.2 = 6.1 -> 7, down from 16
    assert p.steps[-1].stale == [[(10, True), (60, False)]] * 4
    assert p.in_flight(EMPTY, 5) == 7


def test_unseen_stale_drops_are_censored_at_the_last_cut_off():
    p = AutoProvision(4, 2, 1000, 4)
    p.observe(counters([[10, 10]] * 8), EMPTY, 0)
    p.in_flight(EMPTY, 1)  # T = 10, cut-off 45
    p.observe(counters([]), EMPTY, 1)
    p.observe(counters([], stale=2), EMPTY, 2)  # groups this provisioner never saw buffered
    assert p.steps[-1].stale == [[(45, False)] * 2] * 2


def test_clamped_to_max_ratio_and_kv_capacity():
    # one straggler of 100 in every group of 8: L_g = 100 = c*, T = max(107/8, 100/4.5) = 22.2,
    # c = 100 -> 4 x 100 / 22.2 = 18 -> clamped to 4N = 16
    hist = [[1] * 7 + [100]] * 8
    p = AutoProvision(4, 8, 100, 4)
    p.observe(counters(hist), EMPTY, 0)
    assert p.in_flight(EMPTY, 1) == 16
    # the long-tail case above (N' = 10) with room for 8 fresh groups of 2 x 17.5 tokens
    q = AutoProvision(7, 2, 100, 4, kv_token_capacity=280)
    q.observe(counters([[10, 10]] * 4 + [[10, 40]] * 4), EMPTY, 0)
    assert q.in_flight(EMPTY, 1) == 8 and q.last_plan.kv_limit == 8
    # never below N, even when not even N fit
    r = AutoProvision(7, 2, 100, 4, kv_token_capacity=10)
    r.observe(counters([[10, 10]] * 8), EMPTY, 0)
    assert r.in_flight(EMPTY, 1) == 7


# ---- through the scheduler -------------------------------------------------------------------


class TickEngine(SingleEngine):
    """One token per event-loop turn per request, up to the request's budget."""

    max_model_len, errored = 10_000, False

    def __init__(self) -> None:
        self.policy_version, self._aborted = 0, set()

    def decode(self, ids):
        return ""

    async def stream(self, prompt_ids, max_tokens, sampling, request_id):
        for i in range(max_tokens):
            await asyncio.sleep(0)
            if request_id in self._aborted:
                yield TokenChunk([], [], self.policy_version, "aborted")
                return
            yield TokenChunk([7], [-0.5], self.policy_version, "length" if i == max_tokens - 1 else None)

    async def abort(self, ids):
        self._aborted.update(ids)


def test_scheduler_runs_auto_and_the_provisioner_sees_every_stale_drop():
    n, g = 3, 2
    cfg = SimpleNamespace(groups_per_step=n, group_size=g, over_provision="auto", partial=True,
                          max_staleness=1, max_tokens=200, temperature=1.0, top_p=1.0)
    uids = iter(range(10**6))
    source = lambda: (next(uids), {}, [1, 2])  # noqa: E731
    long_tail = lambda group, i: 150 if (group.uid % 4 == 0 and i == 0) else 5  # noqa: E731
    reject = lambda group: group.uid % 10 != 3  # noqa: E731 - 1 in 10 rejected

    def score(group):
        for s in group.samples:
            s.reward = 0.0

    sched = AprilScheduler(TickEngine(), cfg, source, score, reject, budget_fn=long_tail)
    assert isinstance(sched.provision, AutoProvision)
    stale = []

    async def steps():
        for _ in range(12):
            res = await sched.step()
            assert len(res.groups) == n
            assert n <= res.metrics["rollout/in_flight_groups"] <= 4 * n
            stale.append(res.metrics["rollout/staleness_drops"])
            sched.engine.policy_version += 1
    asyncio.run(steps())
    window = list(sched.provision.steps)
    assert sum(stale) > 0  # the 150-token groups cannot finish within 2 steps
    assert sum(len(s.stale) for s in window) == sum(stale[-len(window):])
    assert all(max(n for n, _ in obs) > 0 for s in window for obs in s.stale)
    assert sched.provision.last_plan.acceptance < 1.0


def test_make_provision_passes_options():
    p = make_provision("auto", 4, 2, 100, 1, kv_token_capacity=123, stale_budget=0.1)
    assert isinstance(p, AutoProvision) and p.kv_token_capacity == 123 and p.stale_budget == 0.1
