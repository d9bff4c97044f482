"""Buffer, ledger and scheduler bookkeeping without an engine (a scripted fake streams tokens)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from types import SimpleNamespace

import pytest

from rollover.rollout.april import AprilScheduler, RolloutExhausted, TooManyFailures
from rollover.rollout.buffer import PartialBuffer, group_age
from rollover.rollout.engine import TokenChunk
from rollover.rollout.engine_api import SingleEngine
from rollover.rollout.ledger import Ledger, LedgerError
from rollover.rollout.types import Group, Sample


def _group(uid: int, versions: list[int] | None = None) -> Group:
    s = Sample([1, 2], response_ids=[5] * len(versions or []), logprobs=[-0.1] * len(versions or []),
               versions=list(versions or []), finish_reason="aborted" if versions else None)
    return Group(uid, {"q": uid}, [s])


# ---- ledger --------------------------------------------------------------------------------


def test_ledger_rejects_double_draw_illegal_moves_and_reasonless_drops():
    ledger = Ledger()
    ledger.draw(1)
    with pytest.raises(LedgerError):
        ledger.draw(1)
    with pytest.raises(LedgerError):
        ledger.move(2, "buffered")  # never drawn
    with pytest.raises(LedgerError):
        ledger.move(1, "dropped")  # no reason
    ledger.move(1, "returned")
    with pytest.raises(LedgerError):
        ledger.move(1, "buffered")  # returned is final
    ledger.draw(2)
    ledger.move(2, "buffered")
    with pytest.raises(LedgerError):
        ledger.move(2, "returned")  # must go back in flight first
    ledger.move(2, "dropped", "stale")
    assert ledger.counts() == {"drawn": 2, "in_flight": 0, "buffered": 0, "returned": 1, "dropped": 1}
    assert ledger.drop_reasons() == {"stale": 1}


def test_ledger_check_and_state_roundtrip():
    ledger = Ledger()
    for uid in range(4):
        ledger.draw(uid)
    ledger.move(0, "buffered")
    ledger.move(1, "dropped", "filtered")
    ledger.move(2, "returned")
    with pytest.raises(LedgerError):  # uid 3 is still in flight: not a state to save
        Ledger().load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    ledger.move(3, "buffered")
    ledger.check(in_flight=set(), buffered={0, 3})
    with pytest.raises(LedgerError):
        ledger.check(in_flight=set(), buffered={0})
    restored = Ledger()
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.counts() == ledger.counts()
    assert restored.drop_reasons() == {"filtered": 1}
    assert restored.place(3) == "buffered"


# ---- buffer --------------------------------------------------------------------------------


def test_buffer_pops_oldest_first_and_drops_stale():
    buf = PartialBuffer()
    for uid, versions in [(7, [3, 3]), (2, [1, 2]), (5, []), (4, [0])]:
        buf.put(_group(uid, versions))
    with pytest.raises(ValueError):
        buf.put(_group(7))
    assert group_age(_group(1, [1, 3]), current_version=3) == 2
    assert buf.staleness_histogram(3) == {0: 2, 2: 1, 3: 1}
    stale = buf.take_stale(current_version=3, max_staleness=1)
    assert [g.uid for g in stale] == [2, 4]  # ages 2 and 3; the token-less group is never stale
    assert [buf.pop_oldest().uid for _ in range(2)] == [5, 7]
    assert buf.pop_oldest() is None


def test_buffer_state_roundtrip_keeps_tokens_and_versions():
    buf = PartialBuffer()
    buf.put(_group(3, [0, 1, 1]))
    state = json.loads(json.dumps(buf.state_dict()))
    other = PartialBuffer()
    other.load_state_dict(state)
    (g,) = other.groups()
    assert g.uid == 3 and g.samples[0].versions == [0, 1, 1] and g.samples[0].finish_reason == "aborted"


# ---- scheduler against a scripted engine ---------------------------------------------------


class FakeEngine(SingleEngine):
    """Streams token 7 once per `tick` until the budget, or `stop_at` tokens (then `stop`)."""

    def __init__(self, stop_at, tick: float = 0.0005, max_model_len: int = 64):
        self.stop_at = stop_at  # (prompt_ids) -> total response length at which the sample stops
        self.tick = tick
        self.max_model_len = max_model_len
        self.policy_version = 0
        self.errored = False
        self.requests: list[tuple[str, int, int]] = []  # (request id, sent length, budget)
        self._aborted: set[str] = set()
        self._open: set[str] = set()

    def decode(self, ids):
        return "x" * len(ids)

    async def stream(self, prompt_ids, max_tokens, sampling, request_id):
        self.requests.append((request_id, len(prompt_ids), max_tokens))
        self._open.add(request_id)
        try:
            stop = self.stop_at(prompt_ids)
            done = len(prompt_ids) - 2  # prompts are 2 tokens in these tests
            for i in range(max_tokens):
                await asyncio.sleep(self.tick)
                if request_id in self._aborted:
                    yield TokenChunk([], [], self.policy_version, "aborted")
                    return
                done += 1
                finish = "stop" if done >= stop else ("length" if i == max_tokens - 1 else None)
                yield TokenChunk([7], [-0.5], self.policy_version, finish)
                if finish:
                    return
        finally:
            self._open.discard(request_id)

    async def abort(self, ids):
        live = [i for i in ids if i in self._open]
        self._aborted.update(live)
        return len(live)


def _config(**kw):
    base = dict(groups_per_step=3, group_size=2, over_provision=2.0, partial=True,
                max_staleness=4, max_tokens=20, temperature=1.0, top_p=1.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _source(lengths: dict[int, int], too_long: set[int] = frozenset(), limit: int | None = None,
            start: int = 0):
    """Prompt uid u -> [u, u]; `lengths[u]` is where its samples stop (default 3)."""
    def items():
        uid = start
        while limit is None or uid < limit:
            yield uid, {"uid": uid}, ([uid] * 70 if uid in too_long else [uid, uid])
            uid += 1
    return items()


def _sample_of(request_id: str) -> tuple[int, int]:
    """(group uid, sample index) from a request id `<scheduler>-g<uid>-s<index>-<n>`."""
    found = re.search(r"(?:^|-)g(\d+)-s(\d+)-", request_id)
    return int(found[1]), int(found[2])


def _stop_by_uid(lengths):
    return lambda prompt_ids: lengths.get(prompt_ids[0], 3)


def _score(group):
    for s in group.samples:
        s.reward = float(len(s.response_ids))


def _run(coro):
    return asyncio.run(coro)


def test_exactly_n_groups_and_conservation_over_steps_with_random_filter():
    rng = random.Random(0)
    lengths = {u: rng.choice([2, 3, 15, 40]) for u in range(400)}
    engine = FakeEngine(_stop_by_uid(lengths))
    rejected: set[int] = set()

    def flaky_filter(group):
        if rng.random() < 0.3:
            rejected.add(group.uid)
            return False
        return True

    sched = AprilScheduler(engine, _config(), _source(lengths, too_long={5, 9}), _score, flaky_filter)
    returned: list[int] = []

    async def steps():
        for _ in range(8):
            res = await sched.step()
            assert len(res.groups) == 3
            assert all(g.finished and g.scored for g in res.groups)
            returned.extend(g.uid for g in res.groups)
    _run(steps())
    assert len(returned) == len(set(returned)) == 24
    drawn = set(range(sched.ledger.counts()["drawn"]))
    buffered = {g.uid for g in sched.buffer.groups()}
    parts = [set(returned), rejected, {5, 9}, buffered]
    assert sum(len(p) for p in parts) == len(drawn) and set().union(*parts) == drawn
    assert sched.ledger.drop_reasons() == {"filtered": len(rejected), "prompt_too_long": 2}
    # nothing generated twice: each resumed request starts where the sample stood
    for g in sched.buffer.groups():
        for s in g.samples:
            assert len(s.response_ids) == len(s.logprobs) == len(s.versions) <= 20


def test_reward_before_filter_counts_the_groups_the_filter_dropped():
    """The policy's own success rate: returned and filtered samples alike (swarm bench metric)."""
    lengths = {u: (2 if u % 2 else 7) for u in range(200)}
    engine = FakeEngine(_stop_by_uid(lengths))
    dropped: list[list[float]] = []

    def drop_the_long(group):  # rewards are response lengths (_score): drop the 7-token groups
        if all(len(s.response_ids) == 7 for s in group.samples):
            dropped.append([float(len(s.response_ids)) for s in group.samples])
            return False
        return True

    sched = AprilScheduler(engine, _config(), _source(lengths), _score, drop_the_long)

    async def steps():
        for _ in range(6):
            before = len(dropped)
            res = await sched.step()
            kept = [r for g in res.groups for r in g.rewards]
            scored = kept + [r for group in dropped[before:] for r in group]
            assert res.metrics["rollout/reward_before_filter"] == pytest.approx(sum(scored) / len(scored))
    _run(steps())
    assert dropped  # the long groups finished in some step and were dropped there


def test_sync_baseline_runs_everything_to_completion():
    lengths = {u: (40 if u % 3 == 0 else 3) for u in range(50)}
    engine = FakeEngine(_stop_by_uid(lengths))
    sched = AprilScheduler(engine, _config(over_provision=1.0, partial=False), _source(lengths), _score)

    async def steps():
        for _ in range(3):
            res = await sched.step()
            assert res.metrics["rollout/requests_aborted"] == 0
            assert len(sched.buffer) == 0
    _run(steps())
    assert sched.ledger.counts()["drawn"] == 9  # never more than N groups started
    assert all(r[2] == 20 for r in engine.requests)  # one full-budget request per sample


def test_partial_off_with_over_provision_drops_unfinished_with_reason():
    lengths = {u: (40 if u >= 3 else 2) for u in range(50)}
    engine = FakeEngine(_stop_by_uid(lengths), tick=0.002)
    sched = AprilScheduler(engine, _config(partial=False), _source(lengths), _score)
    res = _run(sched.step())
    assert [g.uid for g in res.groups] == [0, 1, 2]
    assert sched.ledger.drop_reasons() == {"unfinished": 3}
    assert res.metrics["rollout/drops"] == {"unfinished": 3}
    assert len(sched.buffer) == 0


def test_partial_on_buffers_unfinished_and_resumes_with_remaining_budget():
    lengths = {u: (40 if u >= 3 else 2) for u in range(50)}
    engine = FakeEngine(_stop_by_uid(lengths), tick=0.002)
    sched = AprilScheduler(engine, _config(), _source(lengths), _score)
    _run(sched.step())
    kept = {g.uid: [len(s.response_ids) for s in g.samples] for g in sched.buffer.groups()}
    assert set(kept) == {3, 4, 5} and all(0 < n < 20 for ns in kept.values() for n in ns)
    engine.requests.clear()

    async def later():
        return await sched.step()
    res = _run(later())
    assert [g.uid for g in res.groups][:3] == [3, 4, 5]  # resumed groups first, oldest first
    sent = {_sample_of(rid): (n, b) for rid, n, b in engine.requests}
    assert len(sent) == len(engine.requests)  # one request per sample in this step
    for uid, lens in kept.items():
        for i, n in enumerate(lens):
            assert sent[(uid, i)] == (2 + n, 20 - n)
    for g in res.groups:
        assert all(len(s.response_ids) == 20 and s.finish_reason == "length" for s in g.samples)


def test_exhausted_source_and_scorer_errors_lose_nothing():
    lengths = {}
    sched = AprilScheduler(FakeEngine(_stop_by_uid(lengths)), _config(), _source(lengths, limit=2), _score)
    with pytest.raises(RolloutExhausted):
        _run(sched.step())
    assert sched.buffer.uids() == {0, 1} and sched.ledger.counts()["buffered"] == 2

    def broken(group):
        raise ZeroDivisionError("judge down")
    sched = AprilScheduler(FakeEngine(_stop_by_uid(lengths)), _config(), _source(lengths), broken)
    with pytest.raises(TooManyFailures, match=r"groups failed in one step \(limit 12\)"):  # 2 x N'
        _run(sched.step())
    assert sched.ledger.counts()["dropped"] == 0  # one failed attempt each: all kept to retry
    assert set(sched.attempts.values()) == {1}
    sched.check_conservation()
    assert sched.ledger.counts()["in_flight"] == 0 and len(sched.buffer) == sched.ledger.counts()["drawn"]
    assert all(g.finished and not g.scored for g in sched.buffer.groups() if g.finished)


def test_restored_checkpoint_refuses_an_engine_on_older_weights():
    from rollover.rollout.april import StaleEngineError

    lengths = {u: (40 if u % 2 else 2) for u in range(100)}
    engine = FakeEngine(_stop_by_uid(lengths), tick=0.002)
    engine.policy_version = 3
    sched = AprilScheduler(engine, _config(), _source(lengths), _score)
    _run(sched.step())
    buffered = sched.buffer.uids()
    unfinished = {g.uid for g in sched.buffer.groups() if not g.finished}
    assert unfinished
    state = json.loads(json.dumps(sched.state_dict()))
    fresh = FakeEngine(_stop_by_uid(lengths), tick=0.002)  # restarted: version 0, old weights
    drawn = sched.ledger.counts()["drawn"]
    restored = AprilScheduler(fresh, _config(), _source(lengths, start=drawn), _score)
    restored.load_state_dict(state)
    with pytest.raises(StaleEngineError):
        _run(restored.step())
    assert restored.buffer.uids() == buffered  # the refused step lost nothing
    fresh.policy_version = 3  # what update_weights(weights, version=3) does
    _run(restored.step())
    resumed = {_sample_of(r[0])[0] for r in fresh.requests}
    assert unfinished <= resumed
    restored.check_conservation()


def test_slow_scoring_does_not_hold_up_the_step_and_is_redone_on_resume():
    import threading
    import time

    calls = {"slow": 0}
    release = threading.Event()

    def scorer(group):
        if group.uid == 1 and calls["slow"] == 0:  # a judge that hangs on its first call
            calls["slow"] += 1
            release.wait(5)
        _score(group)

    lengths = {u: (2 if u != 1 else 2) for u in range(50)}
    engine = FakeEngine(_stop_by_uid(lengths), tick=0.004)
    sched = AprilScheduler(engine, _config(), _source(lengths), scorer)
    t0 = time.perf_counter()
    first = _run(sched.step())
    assert time.perf_counter() - t0 < 2
    assert 1 not in {g.uid for g in first.groups}
    (held,) = [g for g in sched.buffer.groups() if g.uid == 1]
    assert held.finished and not held.scored  # buffered unscored; the late result is discarded
    release.set()
    second = _run(sched.step())
    (again,) = [g for g in second.groups if g.uid == 1]  # resumed first, scored this time
    assert again.scored and again.samples[0].reward == 2.0
    sched.close()


def test_token_staleness_counts_every_token_by_age():
    """Samples of one version (counted by length) and of several (counted token by token)."""
    from rollover.rollout.metrics import token_staleness

    def sample(versions):
        return Sample([1], response_ids=[7] * len(versions), versions=list(versions))

    groups = [Group(0, {}, [sample([5, 5, 5]), sample([3, 4, 4, 5]), sample([])]),
              Group(1, {}, [sample([4]), sample([5, 3, 5])])]  # out of order: counted all the same
    # by hand: version 5 (age 0): 3 + 1 + 2; version 4 (age 1): 2 + 1; version 3 (age 2): 1 + 1
    assert token_staleness(groups, 5) == {0: 6, 1: 3, 2: 2}
