"""The engine pool's routing, fan-out and migration logic, against fake engines that can die.

The Ray-hosted engines are tested in tests/integration/test_cluster.py; here the fakes make
deaths land exactly where a test wants them, which a real actor kill cannot.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from test_buffer import FakeEngine, _config, _sample_of, _score, _source

from rollover.rollout.april import AprilScheduler
from rollover.rollout.engine import TokenChunk
from rollover.rollout.pool import AllEnginesLost, EnginePool
from rollover.rollout.remote import EngineLost, RemoteEngine
from rollover.rollout.settings import EngineSettings
from rollover.rollout.weights.weight_check import EngineReading


class MortalEngine(FakeEngine):
    """A fake engine that dies after `dies_after` streamed tokens (all its streams end)."""

    def __init__(self, name: str, dies_after: int | None = None, **kw) -> None:
        super().__init__(lambda prompt_ids: 10**6, **kw)  # every sample runs to its budget
        self.name, self.dies_after, self.streamed = name, dies_after, 0
        self.loads: list[int] = []  # versions loaded, in order
        self.streamed_by_request: Counter = Counter()

    @property
    def active_requests(self) -> set[str]:
        return set(self._open)

    def mark_lost(self, why: str) -> None:
        self.errored = True

    async def stream(self, prompt_ids, max_tokens, sampling, request_id):
        if self.errored:
            raise EngineLost(f"{self.name} is dead")
        async for chunk in super().stream(prompt_ids, max_tokens, sampling, request_id):
            if self.errored:
                raise EngineLost(f"{self.name} died")
            self.streamed += len(chunk.token_ids)
            self.streamed_by_request[request_id] += len(chunk.token_ids)
            yield chunk
            if self.dies_after is not None and self.streamed >= self.dies_after:
                self.errored = True

    async def wait_idle(self, timeout=10.0, request_ids=None):
        if self.errored:
            raise EngineLost(f"{self.name} is dead")
        while self._open:
            await asyncio.sleep(0.001)

    async def update_weights(self, weights, version=None, keep_requests=False, recompute_kv=False):
        if self.errored:
            raise EngineLost(f"{self.name} is dead")
        self.policy_version = self.policy_version + 1 if version is None else version
        self.loads.append(self.policy_version)
        return self.policy_version

    def shutdown(self) -> None:
        self.errored = True


def assert_each_token_once(groups, engines, tokens: int) -> None:
    """Every streamed token is in its sample exactly once, whichever engine streamed it."""
    for g in groups:
        for i, s in enumerate(g.samples):
            mine = [rid for e in engines for rid, _, _ in e.requests if _sample_of(rid) == (g.uid, i)]
            streamed = sum(e.streamed_by_request[rid] for e in engines for rid in mine)
            assert len(s.response_ids) == streamed == tokens


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def scheduler(pool, n=4, max_tokens=20, **config):
    lengths = {}
    return AprilScheduler(pool, _config(groups_per_step=n, group_size=2, over_provision=1.0,
                                        max_tokens=max_tokens, **config),
                          _source(lengths), _score)


@pytest.mark.parametrize("ticks", [(0.0005, 0.0005), (0.0005, 0.003)])
def test_groups_go_whole_to_the_least_loaded_engine(ticks):
    # partial: false starts exactly N groups (launched + accepted <= N'); with recycling on, a
    # group finishing first is replaced by a fresh one, so how many groups ran depended on which
    # engine's streams ended first (a:3, b:3 under load). The slower `b` makes that order certain.
    a, b = MortalEngine("a", tick=ticks[0]), MortalEngine("b", tick=ticks[1])
    pool = EnginePool([a, b])
    sched = scheduler(pool, partial=False)
    try:
        result = run(sched.step())
    finally:
        sched.close()
    assert len(result.groups) == 4
    engines_of = {}
    for engine in (a, b):
        for rid, _, _ in engine.requests:
            engines_of.setdefault(_sample_of(rid)[0], set()).add(engine.name)
    assert all(len(names) == 1 for names in engines_of.values()), engines_of  # a group stays together
    per_engine = Counter(next(iter(names)) for names in engines_of.values())
    assert per_engine == {"a": 2, "b": 2}  # equal budgets: the load splits evenly


def test_a_dying_engine_hands_its_groups_over_without_losing_or_redoing_a_token():
    a, b = MortalEngine("a", dies_after=9, tick=0.002), MortalEngine("b", tick=0.002)
    spare = MortalEngine("a2")
    started = []

    async def replace(index):
        started.append(index)
        return spare

    pool = EnginePool([a, b], replace=replace)
    sched = scheduler(pool, max_tokens=20)

    async def go():
        result = await sched.step()
        await pool.settle()
        return result

    try:
        result = run(go())
    finally:
        sched.close()
    assert a.errored and started == [0] and pool.members[0].engine is spare
    assert result.metrics["rollout/migrations"] > 0
    sched.check_conservation()
    assert_each_token_once(result.groups, (a, b), 20)
    assert pool.revivals == 1 and all(m.alive for m in pool.members)


def test_weights_fan_out_at_one_version_and_a_replacement_catches_up():
    a, b = MortalEngine("a"), MortalEngine("b")
    spare = MortalEngine("a2")
    replacing = asyncio.Event()

    async def replace(index):
        await replacing.wait()  # a load happens while the replacement starts
        return spare

    async def go():
        pool = EnginePool([a, b], replace=replace)
        assert await pool.update_weights({"w": __import__("torch").zeros(2)}) == 1
        assert a.loads == [1] and b.loads == [1]
        a.errored = True
        assert await pool.update_weights({"w": __import__("torch").ones(2)}) == 2
        assert pool.members[0].reviving is None  # the load found no live a: nothing to revive yet
        pool.lost(pool.members[0])
        await pool.update_weights({"w": __import__("torch").ones(2)}, version=7)
        assert pool.policy_version == 7 and b.loads == [1, 2, 7]
        replacing.set()
        await pool.settle()
        return pool

    pool = run(go())
    assert spare.loads == [7] and pool.policy_version == 7
    assert [m.engine.policy_version for m in pool.members] == [7, 7]


def test_the_pool_version_is_the_lowest_any_live_engine_serves():
    a, b = MortalEngine("a"), MortalEngine("b")
    pool = EnginePool([a, b])
    a.policy_version, b.policy_version = 3, 5
    assert pool.policy_version == 3
    a.errored = True
    assert pool.policy_version == 5
    pool.policy_version = 6
    assert b.policy_version == 6


def test_with_every_engine_dead_and_no_replacement_the_step_stops_in_one_line():
    a, b = MortalEngine("a", dies_after=2), MortalEngine("b", dies_after=2)
    pool = EnginePool([a, b])
    sched = scheduler(pool)
    try:
        with pytest.raises(EngineLost):
            run(sched.step())
    finally:
        sched.close()
    assert pool.errored
    sched.check_conservation()  # every group filed before the error left the step
    with pytest.raises(AllEnginesLost):
        pool.route()


def test_a_one_engine_pool_waits_for_its_replacement_and_counts_no_failure():
    # The only engine dies mid-step; while its replacement starts no engine is alive. The groups
    # wait for it and finish there: nothing is retried, dropped or counted as a failed attempt.
    a, spare = MortalEngine("a", dies_after=9, tick=0.002), MortalEngine("a2", tick=0.002)

    async def replace(index):
        await asyncio.sleep(0.3)  # an engine start takes a while
        return spare

    pool = EnginePool([a], replace=replace)
    sched = scheduler(pool, n=4, max_tokens=20)
    try:
        result = run(sched.step())
    finally:
        sched.close()
    assert a.errored and pool.members[0].engine is spare and pool.revivals == 1
    assert len(result.groups) == 4 and not sched.attempts
    assert result.metrics["rollout/retries"] == {} and result.metrics["rollout/drops"] == {}
    sched.check_conservation()
    assert_each_token_once(result.groups, (a, spare), 20)
    assert pool.members[0].outstanding_tokens == 0  # the dead engine's leases left no load behind


def test_a_replacement_that_does_not_come_back_in_time_stops_the_step_without_failing_groups():
    a = MortalEngine("a", dies_after=5, tick=0.002)

    async def replace(index):
        await asyncio.sleep(60)  # hangs far beyond the pool's deadline
        return MortalEngine("never")

    pool = EnginePool([a], replace=replace, revival_timeout_s=0.3)
    sched = scheduler(pool, n=4, max_tokens=20)

    async def go():
        started = asyncio.get_running_loop().time()
        with pytest.raises(AllEnginesLost, match="no replacement was back within"):
            await sched.step()
        return asyncio.get_running_loop().time() - started

    try:
        took = run(go())
    finally:
        sched.close()
        pool.shutdown()
    assert took < 5  # the deadline, not the scheduler's 30 s abort timeout
    assert not sched.attempts  # the engine's death is no failed attempt of any group
    sched.check_conservation()  # every group filed before the error left the step


def test_a_lease_on_a_replaced_engine_leaves_the_replacement_s_load_alone():
    a, b, spare = MortalEngine("a"), MortalEngine("b"), MortalEngine("a2")

    async def replace(index):
        return spare

    async def go():
        pool = EnginePool([a, b], replace=replace)
        old = pool.route(30)  # on a (ties: the lowest index)
        pool.lost(pool.members[0], a)
        await pool.settle()
        assert pool.members[0].engine is spare and not old.valid
        new = await pool.acquire(5)  # the replacement starts empty: it is the least loaded
        old.release()  # the group that held the old lease moves on
        return pool, new

    pool, new = run(go())
    assert new.member is pool.members[0] and new.valid
    assert pool.load() == [5, 0]  # only the new lease counts, never below it


class FirstSampleStopsEarly(MortalEngine):
    """Sample 0 of every group stops after 2 tokens (as at EOS); the others use their budget."""

    async def stream(self, prompt_ids, max_tokens, sampling, request_id):
        self.stop_at = (lambda p: 2) if _sample_of(request_id)[1] == 0 else (lambda p: 10**6)
        async for chunk in super().stream(prompt_ids, max_tokens, sampling, request_id):
            yield chunk


def test_a_sample_that_stops_early_gives_its_unused_budget_back_to_its_engine():
    # The engine's load is what its open requests may still generate: budget minus streamed.
    a = FirstSampleStopsEarly("a", tick=0.002)
    pool = EnginePool([a])
    # partial: false runs exactly these 2 groups to the end: with recycling on, a refill group is
    # aborted when the step ends, and its lease is released a round after its requests close.
    sched = scheduler(pool, n=2, max_tokens=20, partial=False)
    seen, routed = [], []
    acquire = pool.acquire

    async def counting_acquire(tokens=0):
        routed.append(tokens)
        return await acquire(tokens)

    pool.acquire = counting_acquire

    async def watch():
        while True:
            await asyncio.sleep(0.003)
            if len({_sample_of(rid) for rid, _, _ in a.requests}) < 2 * len(routed):
                # A group is routed (its budgets count from then on) but its requests start in
                # the loop's next round: under load this watcher could look in between.
                continue
            budgets = {rid: budget for rid, _, budget in a.requests}
            left = sum(budgets[rid] - a.streamed_by_request[rid] for rid in a._open)
            open_samples = {_sample_of(rid) for rid in a._open}
            alone = any(i == 1 and (uid, 0) not in open_samples for uid, i in open_samples)
            seen.append((pool.members[0].outstanding_tokens, left, alone))

    async def go():
        watcher = asyncio.ensure_future(watch())
        try:
            return await sched.step()
        finally:
            watcher.cancel()

    try:
        run(go())
    finally:
        sched.close()
    assert any(alone for _, _, alone in seen), "no moment with one sample of a group done"
    assert all(load == left for load, left, _ in seen), [x for x in seen if x[0] != x[1]][:5]
    assert pool.members[0].outstanding_tokens == 0  # nothing leased once the step is over


# ---- engine actors: control calls under a deadline, the version ahead of later calls ------------


def _ready(value):
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class FakeActorHandle:
    """A Ray engine actor's handle, in process: each `.remote` call runs as its own task, as Ray
    runs an async actor's calls (concurrently, in no promised order). `abort_hangs`: abort never
    returns; `version_delay`: set_policy_version takes that long; a stream yields one chunk at
    the actor's version (or waits for the kill with `stream_hangs`)."""

    def __init__(self, abort_hangs: bool = False, version_delay: float = 0.0, stream_hangs: bool = False):
        self.version, self.calls = 0, []
        self.abort_hangs, self.version_delay, self.stream_hangs = abort_hangs, version_delay, stream_hangs
        self.killed = asyncio.Event()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        body = getattr(type(self), f"do_{name}")

        def remote(*args):
            self.calls.append(name)
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # from a thread (the nccl relay's client): a ref for ray.get
                return SimpleNamespace(ref=name)
            return asyncio.ensure_future(body(self, *args))

        return SimpleNamespace(remote=remote, _method_name=name,
                               options=lambda **_: SimpleNamespace(remote=lambda *a: self.do_stream(*a)))

    async def do_set_policy_version(self, version, order=0):
        await asyncio.sleep(self.version_delay)
        self.version = version
        self.version_orders = getattr(self, "version_orders", []) + [order]

    async def do_abort(self, ids):
        if self.abort_hangs:
            await asyncio.Event().wait()
        return len(ids)

    async def do_start_weight_update(self, *order):
        await asyncio.Event().wait()

    async def do_weight_probe(self, ids):
        return [EngineReading("pid 1", self.version, [0.0] * (len(ids) - 1))]

    async def do_stream(self, prompt_ids, max_tokens, sampling, rid):
        self.calls.append("stream")
        if self.stream_hangs:
            await self.killed.wait()
            return
        yield _ready(TokenChunk([7], [-0.5], self.version, "stop"))


@pytest.fixture
def ray_kill(monkeypatch):
    import ray

    killed = []

    def kill(actor, no_restart=True):
        killed.append(actor)
        actor.killed.set()

    monkeypatch.setattr(ray, "kill", kill)
    return killed


def _remote(actor, timeout_s: float = 600.0) -> RemoteEngine:
    return RemoteEngine(actor, EngineSettings(model="m", weight_load_timeout_s=timeout_s), "e0")


async def _drain(stream) -> list:
    return [chunk async for chunk in stream]


def test_an_engine_actor_whose_abort_never_returns_is_retired_and_replaced(ray_kill):
    hung, spare = FakeActorHandle(abort_hangs=True, stream_hangs=True), MortalEngine("a2")
    remote, b = _remote(hung, timeout_s=0.3), MortalEngine("b")

    async def replace(index):
        return spare

    pool = EnginePool([remote, b], replace=replace)

    async def scenario():
        streaming = asyncio.ensure_future(_drain(remote.stream([1, 2], 5, request_id="r0")))
        while "stream" not in hung.calls:
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        aborted = await pool.abort(["r0"])  # the other engine answers; this one is lost, not an error
        elapsed = time.perf_counter() - started
        await streaming
        await pool.settle()
        return aborted, elapsed

    aborted, elapsed = run(scenario(), timeout=10)
    assert 0.3 <= elapsed < 5 and aborted == 0
    assert ray_kill == [hung] and remote.errored
    assert pool.members[0].engine is spare and pool.revivals == 1 and all(m.alive for m in pool.members)


def test_a_control_call_past_its_deadline_raises_engine_lost_in_one_line(ray_kill):
    remote = _remote(FakeActorHandle(abort_hangs=True, stream_hangs=True), timeout_s=0.2)

    async def scenario():
        streaming = asyncio.ensure_future(_drain(remote.stream([1, 2], 5, request_id="r0")))
        while "stream" not in remote.actor.calls:
            await asyncio.sleep(0.005)
        with pytest.raises(EngineLost) as lost:
            await remote.abort(["r0"])
        await streaming
        return str(lost.value)

    message = run(scenario(), timeout=10)
    assert message == "engine e0's abort did not finish within 0.2 s (rollout.weight_load_timeout_s)"
    assert ray_kill == [remote.actor]


def test_calls_after_a_version_change_see_that_version_though_ray_may_run_them_first():
    # Ray runs an async actor's calls out of order: a probe or a stream sent right after
    # `policy_version = 4` could reach the engine before the version did (seen as "serves policy
    # version 3, the trainer expects 4" in tests/integration/test_cluster.py).
    remote = _remote(FakeActorHandle(version_delay=0.05))

    async def scenario():
        remote.policy_version = 4
        [reading] = await remote.weight_probe([1, 2, 3])
        remote.policy_version = 5
        chunks = await _drain(remote.stream([1, 2], 5, request_id="r1"))
        return reading, chunks

    reading, chunks = run(scenario())
    assert reading.policy_version == 4 and reading.engine == "e0: pid 1"
    assert [c.version for c in chunks] == [5]


def test_an_nccl_relay_call_past_its_deadline_retires_the_engine(monkeypatch, ray_kill):
    import ray

    waited = []

    def get(ref, timeout=None):  # the actor never answers start_weight_update
        waited.append(timeout)
        raise ray.exceptions.GetTimeoutError(f"Get timed out: some object(s) not ready after {timeout} s")

    class Sender:  # vLLM's trainer engine: start, then the broadcasts (none get that far here)
        closed = False

        async def push(self, engine, pairs):
            await asyncio.to_thread(engine.weight_sync_client().start_weight_update)

        def close(self):
            self.closed = True

    monkeypatch.setattr(ray, "get", get)
    actor = FakeActorHandle()
    remote = RemoteEngine(actor, EngineSettings(model="m", weight_load_timeout_s=0.2), "e0", sender=Sender())
    with pytest.raises(EngineLost, match="^engine e0: start_weight_update did not return within 0.2 s"):
        run(remote.update_weights({"w": __import__("torch").zeros(2)}, version=1))
    assert waited == [0.2] and ray_kill == [actor] and remote.errored and remote.sender.closed


def test_back_to_back_version_changes_end_at_the_newest_whatever_order_the_actor_runs_them():
    # Ray may run the first of two set_policy_version calls last (the cluster test saw an engine
    # back at version 3 after 4 was set). The client numbers its calls and the actor's host
    # applies only a newer number than it has applied.
    from rollover.rollout.remote import EngineHost

    handle = FakeActorHandle()
    remote = _remote(handle)

    async def sent():
        remote.policy_version = 3
        remote.policy_version = 4
        await remote._version_applied()

    run(sent())
    assert handle.version_orders == sorted(handle.version_orders) and len(set(handle.version_orders)) == 2

    host = EngineHost.__new__(EngineHost)  # the actor's side, without starting an engine
    host.engine, host._version_order = SimpleNamespace(policy_version=0), 0
    first, second = handle.version_orders
    run(host.set_policy_version(4, second))  # the newer call runs first...
    run(host.set_policy_version(3, first))   # ...and the older one last
    assert host.engine.policy_version == 4
