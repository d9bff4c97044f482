"""The APRIL scheduler on the real vLLM engine (CPU build, builtin:tiny-math).

Expected values come from the tests' own bookkeeping: a spy around the engine records every
request (what was sent, with which budget, which tokens came back), the prompt source records
what it handed out, and the filter records what it rejected.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections import defaultdict

import pytest

from rollover.rollout.april import AprilScheduler
from rollover.rollout.engine import SamplingSettings
from rollover.rollout.types import Group, Sample
from rollover.tasks.arithmetic import arithmetic_record, extract_answer
from rollover.rollout.config import RolloutConfig

pytestmark = pytest.mark.integration

FORCED = SamplingSettings(temperature=1.0, ignore_eos=True)  # lengths = budgets, exactly


class SpyEngine:
    """Delegates to the real engine; records each request and the tokens it returned."""

    def __init__(self, engine):
        self.inner = engine
        self.requests: dict[str, dict] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def policy_version(self) -> int:  # set through the spy too, or the engine never sees it
        return self.inner.policy_version

    @policy_version.setter
    def policy_version(self, version: int) -> None:
        self.inner.policy_version = version

    async def stream(self, prompt_ids, max_tokens, sampling, request_id):
        rec = {"sent": list(prompt_ids), "budget": max_tokens, "got": [], "finish": None}
        self.requests[request_id] = rec
        async for chunk in self.inner.stream(prompt_ids, max_tokens, sampling, request_id=request_id):
            rec["got"] += chunk.token_ids
            rec["finish"] = chunk.finish_reason or rec["finish"]
            yield chunk

    def for_sample(self, uid: int, index: int) -> list[dict]:
        """This sample's requests in submission order (ids are <scheduler>-g<uid>-s<i>-<n>)."""
        mine = re.compile(rf"-g{uid}-s{index}-\d+$")
        return [r for k, r in self.requests.items() if mine.search(k)]  # dicts keep insertion order


class Source:
    """Arithmetic prompts with uids 0, 1, ...; uids in `too_long` get a prompt beyond the context."""

    def __init__(self, tokenizer, too_long=(), start=0):
        self.tokenizer, self.too_long, self.uid = tokenizer, set(too_long), start
        self.drawn: list[int] = []

    def __call__(self):
        uid, self.uid = self.uid, self.uid + 1
        self.drawn.append(uid)
        rec = arithmetic_record(7, uid, 1, 3, 2, True)
        text = rec["question"] * (60 if uid in self.too_long else 1)
        return uid, rec, self.tokenizer.encode(text)


def score(group: Group) -> None:
    for s in group.samples:
        s.reward = float(extract_answer(s.text) == group.task["answer"])


def config(**kw) -> RolloutConfig:
    base = dict(groups_per_step=3, group_size=2, over_provision=2.0, partial=True,
                max_staleness=4, max_tokens=48, temperature=1.0, top_p=1.0)
    return RolloutConfig(**{**base, **kw})


def check_no_regeneration(spy: SpyEngine, group: Group, budget_of) -> None:
    """Each request of a sample starts exactly where the sample stood; nothing is redone."""
    for i, s in enumerate(group.samples):
        so_far: list[int] = []
        for req in spy.for_sample(group.uid, i):
            assert req["sent"] == s.prompt_ids + so_far
            assert req["budget"] == budget_of(group, i) - len(so_far)
            so_far += req["got"]
        assert s.response_ids == so_far
        assert len(s.logprobs) == len(s.versions) == len(so_far) <= budget_of(group, i)


def test_exact_n_conservation_and_restart_over_many_steps(engine, run, tokenizer):
    rng = random.Random(3)
    budgets = defaultdict(lambda: rng.choice([3, 6, 10, 20, 48]))
    budget_of = lambda g, i: budgets[(g.uid, i)]  # noqa: E731
    rejected: set[int] = set()

    def flaky(group: Group) -> bool:
        if rng.random() < 0.25:
            rejected.add(group.uid)
            return False
        return True

    spy = SpyEngine(engine)
    source = Source(tokenizer, too_long={4, 11})
    make = lambda: AprilScheduler(spy, config(), source, score, flaky,  # noqa: E731
                                  sampling=FORCED, budget_fn=budget_of)
    sched = make()
    returned: list[Group] = []
    aborted_seen = 0
    for step in range(6):
        if step == 3:  # checkpoint/restart in the middle: a new scheduler from the state dict
            state = json.loads(json.dumps(sched.state_dict()))
            sched.close()
            sched = make()
            sched.load_state_dict(state)
        before = {k for k, r in spy.requests.items() if r["finish"] == "aborted"}
        result = run(sched.step())
        aborted_now = {k for k, r in spy.requests.items() if r["finish"] == "aborted"} - before
        assert len(result.groups) == 3
        assert all(len(g.samples) == 2 and g.finished and g.scored for g in result.groups)
        assert result.metrics["rollout/requests_aborted"] == len(aborted_now)
        aborted_seen += len(aborted_now)
        returned += result.groups
        run(engine.wait_idle(timeout=5))
    sched.close()

    uids = [g.uid for g in returned]
    assert len(uids) == len(set(uids)) == 18
    buffered = {g.uid for g in sched.buffer.groups()}
    places = [set(uids), rejected, {4, 11}, buffered]
    assert sum(map(len, places)) == len(source.drawn)  # disjoint ...
    assert set().union(*places) == set(source.drawn)  # ... and covering every draw
    assert sched.ledger.drop_reasons() == {"filtered": len(rejected), "prompt_too_long": 2}
    assert aborted_seen > 0  # some groups really were cut off and resumed
    for g in returned + sched.buffer.groups():
        check_no_regeneration(spy, g, budget_of)
    for g in returned:
        for s in g.samples:
            assert s.reward == float(extract_answer(s.text) == g.task["answer"])


def test_resume_from_token_ids_and_zero_budget_without_request(engine, run, tokenizer):
    source = Source(tokenizer, start=1)
    rec = arithmetic_record(7, 0, 1, 3, 2, True)
    prompt = tokenizer.encode(rec["question"])
    done = Sample(prompt, [20] * 48, [-0.5] * 48, [engine.policy_version] * 48, "aborted")
    half = Sample(prompt, [21] * 5, [-0.25] * 5, [engine.policy_version] * 5, "aborted")
    fresh = Sample(prompt)
    group = Group(0, rec, [done, half, fresh])
    state = {"buffer": {"groups": [group.to_state()]},
             "ledger": {"place": {"0": "buffered"}, "reason": {}},
             "policy_version": engine.policy_version, "steps": 0}
    spy = SpyEngine(engine)
    sched = AprilScheduler(spy, config(groups_per_step=1, group_size=3, over_provision=1.0),
                           source, score, sampling=FORCED)
    sched.load_state_dict(state)
    result = run(sched.step())
    sched.close()
    (g,) = result.groups
    assert g.uid == 0 and result.metrics["rollout/groups_resumed"] == 1
    assert spy.for_sample(0, 0) == []  # no budget left: no request
    assert g.samples[0].finish_reason == "length" and g.samples[0].response_ids == [20] * 48
    (req,) = spy.for_sample(0, 1)
    assert req["sent"] == prompt + [21] * 5 and req["budget"] == 43
    assert g.samples[1].response_ids[:5] == [21] * 5 and len(g.samples[1].response_ids) == 48
    assert g.samples[1].logprobs[:5] == [-0.25] * 5
    (req,) = spy.for_sample(0, 2)
    assert req["sent"] == prompt and req["budget"] == 48
    assert result.metrics["rollout/budget_exhausted"] == 1


def test_versions_staleness_and_partial_groups(engine, run, tokenizer):
    # uids 0,1 are short, 2,3 long: 2,3 get cut off and recycled across weight updates.
    budget_of = lambda g, i: 4 if g.uid < 2 or g.uid > 3 else 160  # noqa: E731
    spy = SpyEngine(engine)
    sched = AprilScheduler(spy, config(groups_per_step=2, over_provision=2.0, max_staleness=1,
                                       max_tokens=160), Source(tokenizer), score,
                           sampling=FORCED, budget_fn=budget_of)
    weights = _weights(engine)
    v0 = engine.policy_version

    first = run(sched.step())
    assert [g.uid for g in first.groups] == [0, 1] and sched.buffer.uids() >= {2, 3}
    kept = {g.uid: [len(s.response_ids) for s in g.samples] for g in sched.buffer.groups()}
    assert all(0 < n < 160 for uid in (2, 3) for n in kept[uid])
    assert first.metrics["rollout/requests_aborted"] == sum(
        1 for g in sched.buffer.groups() for s in g.samples if s.finish_reason == "aborted")

    run(engine.update_weights(weights))  # v0 + 1
    second = run(sched.step())
    assert second.metrics["rollout/groups_resumed"] == len(kept)
    tokens = [v for g in second.groups for s in g.samples for v in s.versions]
    assert second.metrics["rollout/offpolicy_token_fraction"] == pytest.approx(
        sum(v < v0 + 1 for v in tokens) / len(tokens))
    for g in second.groups + sched.buffer.groups():
        if g.uid in kept:  # resumed: the old tokens, then new ones from the new weights
            for s, n in zip(g.samples, kept[g.uid]):
                assert s.versions[:n] == [v0] * n
                assert s.versions[n:] == [v0 + 1] * (len(s.versions) - n)
    stale = {g.uid for g in sched.buffer.groups() if g.oldest_version() == v0}
    assert stale >= {2, 3}

    run(engine.update_weights(weights))  # v0 + 2: groups holding v0 tokens are 2 versions old
    third = run(sched.step())
    sched.close()
    assert third.metrics["rollout/staleness_drops"] == len(stale)
    assert sched.ledger.drop_reasons()["stale"] == len(stale)
    assert not stale & {g.uid for g in third.groups}
    assert all(age <= 1 for age in third.metrics["rollout/staleness_hist"])
    run(engine.wait_idle(timeout=5))


def test_sync_baseline_runs_to_completion_with_natural_stops(engine, run, tokenizer):
    sched = AprilScheduler(engine, config(over_provision=1.0, partial=False, max_tokens=32),
                           Source(tokenizer), score)
    for _ in range(2):
        result = run(sched.step())
        assert result.metrics["rollout/requests_aborted"] == 0 and len(sched.buffer) == 0
        assert all(s.finish_reason in ("stop", "length") for g in result.groups for s in g.samples)
    sched.close()
    assert sched.ledger.counts() == {"drawn": 6, "in_flight": 0, "buffered": 0, "returned": 6, "dropped": 0}
    stops = [s for g in result.groups for s in g.samples if s.finish_reason == "stop"]
    assert stops and all(s.response_ids[-1] == tokenizer.eos_token_id for s in stops)  # EOS kept


def _weights(engine):
    from safetensors.torch import load_file
    from pathlib import Path

    tensors = {}
    for f in Path(engine.settings.model).glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def test_aborts_the_engine_starts_itself_resume_the_samples(engine, run, tokenizer):
    """vLLM's own pause (mode="abort") cuts every request; the step resumes them and finishes."""
    budget_of = lambda g, i: 40  # noqa: E731
    spy = SpyEngine(engine)
    sched = AprilScheduler(spy, config(groups_per_step=2, over_provision=1.0, max_tokens=40),
                           Source(tokenizer), score, sampling=FORCED, budget_fn=budget_of)

    async def interrupted_step():
        step = asyncio.create_task(sched.step())
        while sum(len(r["got"]) for r in spy.requests.values()) < 8:
            await asyncio.sleep(0.005)
        await engine.llm.pause_generation(mode="abort", clear_cache=False)  # not the scheduler
        await asyncio.sleep(0.1)
        await engine.llm.resume_generation()
        return await step

    result = run(interrupted_step())
    sched.close()
    assert [g.uid for g in result.groups] == [0, 1]
    # vLLM's pause cut requests of groups 0 and 1 only (each sample was resumed). If group 0
    # finished one scheduler wake-up before group 1, a third group was launched in its place and
    # the scheduler aborted it itself when the step ended: aborted, but not unasked.
    aborted = [k for k, r in spy.requests.items() if r["finish"] == "aborted"]
    unasked = [k for k in aborted if re.search(r"-g[01]-s\d+-\d+$", k)]
    assert unasked and result.metrics["rollout/unasked_aborts"] == len(unasked)
    assert result.metrics["rollout/requests_aborted"] == len(aborted)
    for g in result.groups:
        assert all(len(s.response_ids) == 40 and s.finish_reason == "length" for s in g.samples)
        check_no_regeneration(spy, g, budget_of)
    run(engine.wait_idle(timeout=5))
