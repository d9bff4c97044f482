"""The scheduler on failure paths, against a fake engine that fails on cue.

Every expected value comes from the test's own script: which request of which sample fails how,
what the prompt source handed out, how often the judge was called.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest
from test_buffer import FakeEngine, _config, _sample_of, _score, _source, _stop_by_uid

from rollover.rollout.april import AprilScheduler
from rollover.rollout.engine import TokenChunk


class EngineDead(RuntimeError):
    pass


class FaultyEngine(FakeEngine):
    """FakeEngine whose n-th request of sample (uid, index) can fail: `faults[(uid, index, n)]`.

    Faults: raise_start, raise_mid, cancelled (the stream raises CancelledError), dies (engine
    dead), repetition / error / unasked_abort (vLLM finish reasons after one token),
    stop_on_abort (the request finishes naturally as the abort arrives), error_on_abort (vLLM's
    error arrives as the abort does). `abort_fails` makes
    abort() raise; `decode_fails` makes the first decode raise.
    """

    def __init__(self, stop_at, faults=None, tick=0.002, abort_fails=False, decode_fails=False):
        super().__init__(stop_at, tick=tick)
        self.faults = faults if callable(faults) else (lambda key, f=dict(faults or {}): f.get(key))
        self.abort_fails = abort_fails
        self.decode_fails = decode_fails
        self.seen: Counter = Counter()  # (uid, index) -> requests so far
        self.ids: list[str] = []

    def decode(self, ids):
        if self.decode_fails:
            self.decode_fails = False
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "bad token")
        return super().decode(ids)

    async def abort(self, ids):
        if self.abort_fails:
            raise ConnectionError("engine core unreachable")
        return await super().abort(ids)

    async def stream(self, prompt_ids, max_tokens, sampling, request_id):
        uid, index = _sample_of(request_id)
        fault = self.faults((uid, index, self.seen[(uid, index)]))
        self.seen[(uid, index)] += 1
        self.ids.append(request_id)
        if fault == "raise_start":
            raise RuntimeError("request rejected")
        if fault == "dies":
            self.errored = True
            raise EngineDead("engine core died")
        inner = super().stream(prompt_ids, max_tokens, sampling, request_id)
        try:
            n = 0
            async for chunk in inner:
                n += 1
                if fault == "stop_on_abort" and chunk.finish_reason == "aborted":
                    chunk = TokenChunk([7], [-0.5], chunk.version, "stop")
                elif fault == "error_on_abort" and chunk.finish_reason == "aborted":
                    chunk = TokenChunk(chunk.token_ids, chunk.logprobs, chunk.version, "error")
                elif n == 1 and fault in ("repetition", "error", "unasked_abort"):
                    reason = "aborted" if fault == "unasked_abort" else fault
                    yield TokenChunk(chunk.token_ids, chunk.logprobs, chunk.version, reason)
                    return
                elif n == 2 and fault == "raise_mid":
                    raise RuntimeError("stream broke")
                elif n == 2 and fault == "cancelled":
                    raise asyncio.CancelledError()
                yield chunk
        finally:
            await inner.aclose()


class LoggedSource:
    """_source, remembering every uid it handed out."""

    def __init__(self, lengths, **kw):
        self.items, self.drawn = _source(lengths, **kw), []

    def __call__(self):
        item = next(self.items)
        self.drawn.append(item[0])
        return item


def assert_conserved(sched, source, returned):
    """Nothing in flight; every drawn uid is returned, buffered or dropped, exactly once."""
    counts = sched.ledger.counts()
    assert counts["in_flight"] == 0
    assert sched.ledger.uids("buffered") == sched.buffer.uids()
    dropped = sched.ledger.uids("dropped")
    parts = [set(returned), sched.buffer.uids(), dropped]
    assert sum(map(len, parts)) == len(source.drawn) == counts["drawn"]
    assert set().union(*parts) == set(source.drawn)


def run(coro, timeout=10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- finish reasons and aborts vLLM starts itself --------------------------------------------


def test_repetition_finishes_error_retries_and_unasked_abort_resumes():
    lengths = {3: 15, 4: 15, 5: 15}
    faults = {(0, 0, 0): "repetition", (1, 1, 0): "error", (2, 0, 0): "unasked_abort"}
    engine = FaultyEngine(_stop_by_uid(lengths), faults)
    source = LoggedSource(lengths)
    sched = AprilScheduler(engine, _config(groups_per_step=2), source, _score)
    first = run(sched.step())
    assert [g.uid for g in first.groups] == [0, 2]
    g0, g2 = first.groups
    assert g0.samples[0].finish_reason == "repetition" and g0.samples[0].response_ids == [7]
    assert g0.rewards == [1.0, 3.0]
    # the unasked abort came after 1 token; the sample was resumed at once from that token
    req = [r for r in engine.requests if _sample_of(r[0]) == (2, 0)]
    assert [(n, b) for _, n, b in req] == [(2, 20), (3, 19)]
    assert g2.samples[0].response_ids == [7, 7, 7] and g2.samples[0].finish_reason == "stop"
    assert first.metrics["rollout/unasked_aborts"] == 1
    assert first.metrics["rollout/retries"] == {"engine_error": 1}
    assert first.metrics["rollout/drops"] == {}
    assert sched.attempts == {1: 1}
    (g1,) = [g for g in sched.buffer.groups() if g.uid == 1]
    assert len(g1.samples[1].response_ids) == 1  # the token before the error is kept

    second = run(sched.step())
    assert second.groups[0].uid == 1  # retried first; resumed from its kept token
    req = [r for r in engine.requests if _sample_of(r[0]) == (1, 1)]
    assert [(n, b) for _, n, b in req] == [(2, 20), (3, 19)]
    assert second.groups[0].rewards == [3.0, 3.0] and sched.attempts == {}
    assert_conserved(sched, source, [g.uid for g in first.groups + second.groups])


def test_request_that_always_errors_is_dropped_after_three_attempts():
    engine = FaultyEngine(_stop_by_uid({}), lambda key: "error" if key[0] == 1 else None)
    source = LoggedSource({})
    sched = AprilScheduler(engine, _config(groups_per_step=2, group_size=1, over_provision=1.5),
                           source, _score)
    returned = []
    for _ in range(4):
        returned += [g.uid for g in run(sched.step()).groups]
    assert engine.seen[(1, 0)] == 3
    assert sched.ledger.place(1) == "dropped" and sched.ledger.drop_reasons() == {"engine_error": 1}
    assert 1 not in returned and len(returned) == 8
    assert_conserved(sched, source, returned)


def test_an_error_arriving_as_the_step_stops_counts_as_a_failed_attempt():
    # uid 1 runs long; every one of its requests ends with vLLM's error just as the step aborts it.
    lengths = {0: 2, 1: 40, 2: 2, 3: 2, 4: 2}
    engine = FaultyEngine(_stop_by_uid(lengths), lambda key: "error_on_abort" if key[0] == 1 else None)
    source = LoggedSource(lengths)
    sched = AprilScheduler(engine, _config(groups_per_step=1, group_size=1, over_provision=2),
                           source, _score)
    returned = [g.uid for _ in range(3) for g in run(sched.step()).groups]
    assert engine.seen[(1, 0)] == 3  # three requests, three failed attempts, then dropped
    assert sched.ledger.place(1) == "dropped" and sched.ledger.drop_reasons() == {"engine_error": 1}
    assert 1 not in returned
    assert_conserved(sched, source, returned)
    sched.close()


# ---- slow, hung and failing judges -----------------------------------------------------------


def test_group_finishing_as_the_abort_is_sent_does_not_wait_for_its_judge():
    judged = Counter()

    def slow_judge(group):
        judged[group.uid] += 1
        if group.uid == 1:
            time.sleep(2.0)
        _score(group)

    lengths = {0: 2, 1: 40}
    engine = FaultyEngine(_stop_by_uid(lengths), {(1, 0, 0): "stop_on_abort"})
    sched = AprilScheduler(engine, _config(groups_per_step=1, group_size=1), LoggedSource(lengths),
                           slow_judge)
    started = time.perf_counter()
    result = run(sched.step())
    elapsed = time.perf_counter() - started
    assert [g.uid for g in result.groups] == [0]
    assert elapsed < 1.0, f"the step waited {elapsed:.1f} s for a judge"
    (g1,) = sched.buffer.groups()
    assert g1.uid == 1 and g1.finished and not g1.scored  # scored when resumed
    assert judged[1] == 0
    sched.close()


def test_judge_runs_once_per_group_even_when_a_step_ends_while_it_runs():
    calls = Counter()
    gate = threading.Event()

    def judge(group):
        calls[group.uid] += 1
        if group.uid == 0:
            gate.wait(5)
        _score(group)

    lengths = {0: 2, **{u: 6 for u in range(1, 20)}}
    engine = FaultyEngine(_stop_by_uid(lengths), tick=0.003)
    source = LoggedSource(lengths)
    sched = AprilScheduler(engine, _config(groups_per_step=2, group_size=1), source, judge)
    first = run(sched.step())
    assert 0 not in {g.uid for g in first.groups} and 0 in sched.buffer
    gate.set()
    second = run(sched.step())
    (g0,) = [g for g in second.groups if g.uid == 0]
    assert g0.rewards == [2.0]  # the first call's result (2 tokens)
    assert calls[0] == 1 and set(calls.values()) == {1}
    assert_conserved(sched, source, [g.uid for g in first.groups + second.groups])
    sched.close()


def test_hung_judges_never_starve_the_scoring_pool():
    release = threading.Event()
    hang = {0, 3}

    def judge(group):
        if group.uid in hang:
            release.wait(30)
        _score(group)

    lengths = {u: (2 if u in hang else 4) for u in range(40)}
    engine = FaultyEngine(_stop_by_uid(lengths), tick=0.005)
    sched = AprilScheduler(engine, _config(groups_per_step=2, group_size=1, over_provision=1.5),
                           LoggedSource(lengths), judge, scoring_threads=2)
    try:
        for _ in range(4):  # two hung calls would hold both threads of a 2-thread pool
            assert len(run(sched.step(), timeout=5).groups) == 2
        assert sched.pool.busy <= 2
    finally:
        release.set()
        sched.close()


def test_scorer_or_filter_that_keeps_failing_is_dropped_as_score_error():
    scorer_calls, filter_calls = Counter(), Counter()

    def scorer(group):
        scorer_calls[group.uid] += 1
        if group.uid == 1:
            raise TimeoutError("judge unreachable")
        _score(group)

    def keep(group):
        filter_calls[group.uid] += 1
        if group.uid == 2:
            raise KeyError("reward")
        return True

    engine = FaultyEngine(_stop_by_uid({}))
    source = LoggedSource({})
    sched = AprilScheduler(engine, _config(groups_per_step=2, group_size=2), source, scorer, keep)
    returned = []
    for _ in range(4):
        result = run(sched.step())
        assert len(result.groups) == 2
        returned += [g.uid for g in result.groups]
    assert scorer_calls[1] == 3 and filter_calls[2] == 3
    assert scorer_calls[2] == 1  # the scored group keeps its rewards across retries
    assert sched.ledger.place(1) == sched.ledger.place(2) == "dropped"
    assert sched.ledger.drop_reasons() == {"score_error": 2}
    assert_conserved(sched, source, returned)


# ---- conservation when the engine fails ------------------------------------------------------


@pytest.mark.parametrize("fault", ["raise_start", "raise_mid", "cancelled", "decode", "dies", "abort"])
def test_every_group_is_filed_whatever_the_engine_raises(fault):
    lengths = {u: (40 if u % 2 else 3) for u in range(60)}
    faults = {} if fault in ("decode", "abort") else {(0, 0, 0): fault}  # uid 0: a short group
    engine = FaultyEngine(_stop_by_uid(lengths), faults, abort_fails=fault == "abort",
                          decode_fails=fault == "decode")
    source = LoggedSource(lengths)
    sched = AprilScheduler(engine, _config(), source, _score)
    returned = []
    if fault == "dies":
        with pytest.raises(EngineDead):
            run(sched.step())
    elif fault == "abort":
        with pytest.raises(ConnectionError):
            run(sched.step())
        assert not engine._open  # the cancelled streams ended
    else:
        returned = [g.uid for g in run(sched.step()).groups]
        assert len(returned) == 3
        # a failed group is kept to retry (a cancelled one is not even a failed attempt)
        if fault == "cancelled":
            assert sched.attempts == {} and 1 in sched.buffer
        elif fault == "decode":  # the first group to finish failed once
            assert list(sched.attempts.values()) == [1]
        else:
            assert sched.attempts == {0: 1} and 0 in sched.buffer
        assert sched.ledger.counts()["dropped"] == 0
    assert_conserved(sched, source, returned)
    sched.close()


def test_request_ids_are_unique_per_scheduler_and_per_attempt():
    lengths = {u: (40 if u % 2 else 3) for u in range(60)}
    engine = FaultyEngine(_stop_by_uid(lengths), abort_fails=True)
    a = AprilScheduler(engine, _config(), LoggedSource(lengths), _score)
    b = AprilScheduler(engine, _config(), LoggedSource(lengths), _score)  # the same uids as a
    for sched in (a, b):
        with pytest.raises(ConnectionError):  # a failed step ...
            run(sched.step())
    engine.abort_fails = False
    run(a.step())  # ... retried: the same groups resumed, with new request ids
    samples = [_sample_of(r) for r in engine.ids]
    assert len(set(samples)) < len(samples)  # samples were requested more than once ...
    assert len(set(engine.ids)) == len(engine.ids)  # ... never under the same id
