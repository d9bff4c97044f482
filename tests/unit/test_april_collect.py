"""The lean scheduler (issue 26): heap-ordered buffer, completion-driven collection, its CPU clock.

The scheduler runs for real over simulated engines on a virtual clock (bench/sim/sim_engine.py),
so a step with hundreds of groups in flight costs a fraction of a second here. Costs are
checked by counting operations (comparisons, callback registrations), never by timing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import threading
import time

import pytest

from bench.sim import simulate_scale as sim
from bench.sim.sim_engine import run_virtual
from rollover.rollout.buffer import PartialBuffer
from rollover.rollout.cpu_clock import CpuClock
from rollover.rollout.ledger import BUFFERED, DROPPED, IN_FLIGHT, RETURNED, Ledger
from rollover.rollout.types import Group, Sample

# ---- the buffer --------------------------------------------------------------------------------


class CountedUid(int):
    """An int uid that counts the `<` comparisons made on it (heap or min alike)."""

    lt_calls = 0

    def __lt__(self, other: int) -> bool:
        CountedUid.lt_calls += 1
        return int(self) < int(other)

    def __gt__(self, other: int) -> bool:
        CountedUid.lt_calls += 1
        return int(self) > int(other)


def _group(uid: int, versions: list[int] | None = None) -> Group:
    versions = list(versions or [])
    s = Sample([1, 2], response_ids=[5] * len(versions), logprobs=[-0.1] * len(versions),
               versions=versions, finish_reason="aborted" if versions else None)
    return Group(uid, {"q": int(uid)}, [s])


def test_buffer_pops_in_uid_order_through_puts_pops_and_stale_drops():
    rng = random.Random(1)
    buf, model = PartialBuffer(), {}  # the model: uid -> version, popped by min()
    next_uid, popped, expected = 0, [], []
    for _ in range(3000):
        r = rng.random()
        if r < 0.5:  # a new group, or one popped earlier coming back (resumed, then buffered)
            uid = next_uid if rng.random() < 0.7 or not expected else rng.choice(expected)
            if uid is not None and uid not in model:
                model[uid] = rng.randrange(8)
                buf.put(_group(uid, [model[uid]]))
            next_uid += 1
        elif r < 0.95:
            popped.append(g.uid if (g := buf.pop_oldest()) else None)
            expected.append(min(model) if model else None)
            model.pop(expected[-1], None)
        else:
            stale = [g.uid for g in buf.take_stale(current_version=8, max_staleness=4)]
            assert stale == sorted(u for u, v in model.items() if 8 - v > 4)
            for u in stale:
                del model[u]
        assert len(buf) == len(model) and buf.uids() == set(model)
    assert popped == expected
    assert [g.uid for g in buf.groups()] == sorted(model)


def test_stale_groups_leave_and_the_rest_still_pop_oldest_first():
    buf = PartialBuffer()
    versions = {u: [u % 5] for u in range(40)}
    for u in random.Random(2).sample(range(40), 40):
        buf.put(_group(u, versions[u]))
    stale = buf.take_stale(current_version=4, max_staleness=2)  # age > 2: version 0 or 1
    assert [g.uid for g in stale] == [u for u in range(40) if u % 5 < 2]
    rest = [buf.pop_oldest().uid for _ in range(len(buf))]
    assert rest == [u for u in range(40) if u % 5 >= 2] and buf.pop_oldest() is None


def test_pop_oldest_does_not_scan_the_buffer():
    """4,096 buffered groups: a pop costs about log2(n) comparisons (a heap), not n (a scan)."""
    n = 4096
    buf = PartialBuffer()
    for u in random.Random(3).sample(range(n), n):
        buf.put(_group(CountedUid(u)))
    CountedUid.lt_calls = 0
    first = [buf.pop_oldest().uid for _ in range(64)]
    assert first == list(range(64))
    per_pop = CountedUid.lt_calls / 64
    assert per_pop <= 3 * 12, per_pop  # log2(4096) = 12; a scan would make 4,095


def test_a_checkpointed_buffer_resumes_in_order_from_the_saved_format():
    """The state format is unchanged ({"groups": [Group.to_state(), ...]}): a state saved before
    the heap existed (written here by hand, in any order) loads and pops oldest first."""
    state = {"groups": [_group(u, [1, 2]).to_state() for u in (9, 3, 27, 4)]}
    buf = PartialBuffer()
    buf.load_state_dict(json.loads(json.dumps(state)))
    assert buf.state_dict() == {"groups": [_group(u, [1, 2]).to_state() for u in (3, 4, 9, 27)]}
    buf.put(_group(1))
    assert [buf.pop_oldest().uid for _ in range(5)] == [1, 3, 4, 9, 27]


# ---- the ledger ----------------------------------------------------------------------------------


class ScanCountingDict(dict):
    """A dict that counts passes over all its entries."""

    scans = 0

    def items(self):
        ScanCountingDict.scans += 1
        return super().items()

    def values(self):
        ScanCountingDict.scans += 1
        return super().values()

    def __iter__(self):
        ScanCountingDict.scans += 1
        return super().__iter__()


def test_the_check_after_each_step_does_not_walk_every_prompt_ever_drawn():
    """A long run has drawn millions of prompts; checking the few in flight and buffered must not
    pass over all of them every step."""
    ledger = Ledger()
    for uid in range(20000):
        ledger.draw(uid)
        ledger.move(uid, RETURNED if uid % 3 else DROPPED, None if uid % 3 else "filtered")
    for uid in range(20000, 20010):
        ledger.draw(uid)
        ledger.move(uid, BUFFERED)
    ledger._place = ScanCountingDict(ledger._place)
    ScanCountingDict.scans = 0
    ledger.check(in_flight=set(), buffered=set(range(20000, 20010)))
    assert ScanCountingDict.scans == 0


def test_ledger_places_agree_with_a_scan_through_random_moves_and_a_reload():
    rng = random.Random(4)
    ledger = Ledger()
    for uid in range(300):
        ledger.draw(uid)
    for _ in range(3000):
        uid = rng.randrange(300)
        place = ledger.place(uid)
        options = {IN_FLIGHT: [BUFFERED, RETURNED, DROPPED], BUFFERED: [IN_FLIGHT, DROPPED]}.get(place)
        if options:
            target = rng.choice(options)
            ledger.move(uid, target, "stale" if target == DROPPED else None)
        elif place == RETURNED and rng.random() < 0.1:
            ledger.move(uid, BUFFERED, returned_back=True)

    def scanned(led, where):
        return {u for u, p in led.state_dict()["place"].items() if p == where}

    for where in (IN_FLIGHT, BUFFERED, RETURNED, DROPPED):
        assert {str(u) for u in ledger.uids(where)} == scanned(ledger, where)
    for uid in ledger.uids(IN_FLIGHT):
        ledger.move(uid, BUFFERED)
    reloaded = Ledger()
    reloaded.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    reloaded.check(in_flight=set(), buffered=ledger.uids(BUFFERED))
    reloaded.draw(10**6)
    assert reloaded.uids(IN_FLIGHT) == {10**6}


# ---- the CPU clock -----------------------------------------------------------------------------


def _spin(seconds: float) -> None:
    """Burn `seconds` of this thread's CPU (measured by the thread's own clock, so load-proof)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_clock_counts_the_coroutines_own_cpu_not_what_runs_while_it_waits():
    clock = CpuClock()
    other_thread_cpu = []

    def worker():
        t0 = time.thread_time()
        _spin(0.08)
        other_thread_cpu.append(time.thread_time() - t0)

    async def others():
        _spin(0.1)  # another task on the loop, while the measured one sleeps

    async def measured():
        _spin(0.05)
        task = asyncio.create_task(others())
        thread = threading.Thread(target=worker)
        thread.start()
        await asyncio.sleep(0.01)
        await task
        await clock.pause(asyncio.to_thread(thread.join))  # paused: nothing of ours runs
        await clock.pause(_spinning_coroutine(0.06))  # paused: its CPU is not counted
        _spin(0.05)
        return "done"

    assert asyncio.run(clock.measure(measured())) == "done"
    assert other_thread_cpu and other_thread_cpu[0] >= 0.08
    assert 0.1 <= clock.seconds < 0.1 + 0.04, clock.seconds  # 2 x 0.05 of its own, none of the rest


async def _spinning_coroutine(seconds: float) -> None:
    await asyncio.sleep(0)
    _spin(seconds)
    await asyncio.sleep(0)


def test_clock_times_the_garbage_collector_apart():
    """A collection walks the whole heap, whoever triggers it: counted in gc_seconds only."""
    heap = [[i] for i in range(300_000)]  # containers the collector must walk
    clock = CpuClock()

    async def measured():
        _spin(0.02)
        gc.collect()

    asyncio.run(clock.measure(measured()))
    del heap
    assert clock.gc_seconds > 0.005, clock.gc_seconds
    assert 0.02 <= clock.seconds < 0.02 + 0.5 * clock.gc_seconds, (clock.seconds, clock.gc_seconds)


def test_clock_passes_exceptions_and_cancellation_through():
    clock = CpuClock()

    async def fails():
        await asyncio.sleep(0)
        raise KeyError("x")

    with pytest.raises(KeyError):
        asyncio.run(clock.measure(fails()))

    async def cancelled():
        task = asyncio.create_task(clock.measure(asyncio.sleep(10)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert clock._since is None  # stopped for good


# ---- the scheduler over many simulated engines ---------------------------------------------------


class CountingTask(asyncio.Task):
    """A task that counts the done-callbacks registered on it (asyncio.wait registers one on
    every task it waits for, each time it is called)."""

    registrations = 0
    created = 0

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        CountingTask.created += 1

    def add_done_callback(self, fn, *, context=None):
        CountingTask.registrations += 1
        super().add_done_callback(fn, context=context)


def _counting_factory(loop, coro, context=None):
    return CountingTask(coro, loop=loop, context=context)


def _simulate(engines: int, steps: int, on_step, scheduler_cls=None, **kw):
    args = sim.parse_args(["--no-validate", "--steps", str(steps), "--warmup", "0",
                           "--groups-per-engine", "4"])

    async def main():
        asyncio.get_running_loop().set_task_factory(_counting_factory)
        extra = {"scheduler_cls": scheduler_cls} if scheduler_cls is not None else {}
        return await sim.simulate(args, sim.SimCosts(), engines=engines, mode="april", hetero=False,
                                  train_s=0.2, on_step=on_step, **extra, **kw)

    return run_virtual(main())


def test_many_engines_exact_batches_oldest_first_and_no_callback_per_wakeup():
    """64 engines, N = 256 groups, N' = 512 in flight. Each step returns N groups, conserves
    every prompt, resumes the buffered groups oldest first, and registers O(1) done-callbacks per
    task it starts (one report each, plus the stop's wait and gather), however often it wakes."""
    engines, n = 64, 4 * 64
    log = []

    def on_step(sched, pool, rec):
        sched.check_conservation()
        log.append({"returned": rec["groups_returned"], "resumed": rec["groups_resumed"],
                    "buffer": sorted(sched.buffer.uids()),
                    "registrations": CountingTask.registrations, "tasks": CountingTask.created,
                    "cpu": sched.last_metrics["rollout/scheduler_cpu_s"],
                    "outside": rec["scheduler_task_cpu_s"]})

    starts: list[int] = []
    real_next = PartialBuffer.pop_oldest

    def recording_pop(self):
        group = real_next(self)
        if group is not None:
            starts.append(group.uid)
        return group

    CountingTask.registrations = CountingTask.created = 0
    PartialBuffer.pop_oldest = recording_pop
    try:
        result = _simulate(engines, 4, on_step)
    finally:
        PartialBuffer.pop_oldest = real_next
    assert [s["returned"] for s in log] == [n] * 4
    assert result["in_flight_groups"] == 2 * n
    # the resumed groups of step k+1 are the oldest of what step k buffered, popped in order
    done = 0
    for before, after in zip(log, log[1:]):
        resumed = starts[done:done + after["resumed"]]
        done += after["resumed"]
        assert after["resumed"] > 0 and resumed == before["buffer"][:after["resumed"]]
    # Done-callbacks per task started (group runs, their samples, the pool's fan-out): a few
    # each (asyncio.gather's, the report, the stop's wait), not one per task per wake-up.
    zero = {"registrations": 0, "tasks": 0}
    per_task = [(b["registrations"] - a["registrations"]) / (b["tasks"] - a["tasks"])
                for a, b in zip([zero] + log, log)]
    assert max(per_task) <= 3, per_task
    # the step's CPU metric is there and within what the outside clock saw
    assert all(0 < s["cpu"] <= s["outside"] for s in log)


def _sim_april(n_engines: int, groups: int, group_size: int, max_tokens: int, **kwargs):
    """(engines, pool, scheduler): APRIL (over-provision 2) over simulated engines, in virtual time."""
    from types import SimpleNamespace

    from bench.sim.sim_engine import SimEngine
    from rollover.rollout.april import AprilScheduler
    from rollover.rollout.pool import EnginePool

    engines = [SimEngine(i, sim.SimCosts(), quantum=0.005) for i in range(n_engines)]
    pool = EnginePool(engines)
    cfg = SimpleNamespace(groups_per_step=groups, group_size=group_size, over_provision=2.0, partial=True,
                          max_staleness=4, max_tokens=max_tokens, temperature=1.0, top_p=1.0)
    return engines, pool, AprilScheduler(pool, cfg, sim.Prompts(), sim.no_score, **kwargs)


def test_an_interrupt_mid_step_runs_on_idle_engines_and_is_not_charged_to_the_scheduler():
    """A weight load asked for mid-step wakes the step (its completion queue), runs with nothing
    in flight, and the step resumes its groups under the new version; the load's own CPU is not
    the scheduler's. The groups are paused in place: none goes through the buffer or gets a new
    task, and their aborts are not taken for vLLM's own (no unasked resume counted)."""
    async def main():
        engines, pool, sched = _sim_april(8, 32, 8, 200)
        seen = {}

        async def load():
            seen["open_requests"] = sum(len(e.requests) for e in engines)
            seen["tasks_at_load"] = {uid: run.task for uid, run in sched._live.runs.items()}
            _spin(0.05)
            await pool.update_weights({})
            return "loaded"

        step = asyncio.create_task(sched.step())
        await asyncio.sleep(0.5)  # virtual seconds: every group is mid-generation
        seen["tasks_before"] = {uid: run.task for uid, run in sched._live.runs.items()}
        outcome = await sched.interrupt(load)
        result = await step
        sched.check_conservation()
        sched.close()
        return seen, outcome, result

    seen, outcome, result = run_virtual(main())
    assert outcome == "loaded" and seen["open_requests"] == 0
    assert len(result.groups) == 32 and result.metrics["rollout/interrupts"] == 1
    versions = {v for g in result.groups for s in g.samples for v in s.versions}
    assert versions == {0, 1}  # begun before the load, finished after it
    assert 0 < result.metrics["rollout/scheduler_cpu_s"] < 0.05
    assert len(seen["tasks_before"]) == 64  # over-provision 2 x 32, all generating
    assert seen["tasks_at_load"] == seen["tasks_before"]  # the same runs, the same tasks
    m = result.metrics
    assert m["rollout/groups_resumed"] == 0 and m["rollout/unasked_aborts"] == 0
    assert m["rollout/requests_aborted"] >= 64 * 8  # every sample's request, plus the step's end


def test_an_interrupt_whose_abort_is_lost_stops_the_groups_and_still_loads_on_an_idle_engine(caplog):
    """If the pause's abort does not end the streams within `abort_timeout_s` (a lost abort),
    the step's groups are stopped and buffered as at a step's end (aborted again, cancelled),
    the load still runs with no request open, and the step finishes from the buffer."""
    async def main():
        # 2,000 tokens take ~8 virtual seconds: the streams outlive the 1 s abort timeout
        engines, pool, sched = _sim_april(4, 8, 4, 2000, abort_timeout_s=1.0)
        real_abort, lost = pool.abort, []

        async def first_abort_lost(ids):
            if not lost:
                lost.append(len(ids))
                return 0
            return await real_abort(ids)

        pool.abort = first_abort_lost
        seen = {}

        async def load():
            seen["open_requests"] = sum(len(e.requests) for e in engines)
            await pool.update_weights({})
            return "loaded"

        step = asyncio.create_task(sched.step())
        await asyncio.sleep(0.3)
        outcome = await sched.interrupt(load)
        result = await step
        sched.check_conservation()
        sched.close()
        return seen, outcome, result, lost

    with caplog.at_level("WARNING", logger="rollover.rollout.april"):
        seen, outcome, result, lost = run_virtual(main())
    assert lost and lost[0] > 0  # the pause's abort named open requests and was dropped
    assert outcome == "loaded" and seen["open_requests"] == 0
    assert len(result.groups) == 8 and result.metrics["rollout/interrupts"] == 1
    assert result.metrics["rollout/groups_resumed"] > 0  # stopped, buffered, resumed in the step
    assert any("stopping the step's groups instead" in r.message for r in caplog.records)


def test_a_step_stopped_while_it_winds_down_buffers_its_accepted_groups():
    """A stop (Ctrl-C cancels the step) that lands after N groups were accepted, while the step
    aborts the rest, must still file every group: the accepted ones go back to the buffer (the
    ledger held them in flight and no checkpoint could be written: seen in test_signals)."""
    from rollover.rollout.ledger import IN_FLIGHT

    async def main():
        engines, pool, sched = _sim_april(2, 4, 4, 2000)
        winding_down = asyncio.Event()

        async def stuck_abort(ids):  # the step's final abort never returns
            winding_down.set()
            await asyncio.Event().wait()

        def short_then_long(request_id, prompt_ids):  # groups 0-3 finish, the rest run on
            return 5 if int(re.search(r"-g(\d+)-s", request_id).group(1)) < 4 else 2000

        for e in engines:
            e.stop_at = short_then_long
        pool.abort = stuck_abort
        step = asyncio.create_task(sched.step())
        await winding_down.wait()
        accepted = len(sched._live.accepted)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        sched.check_conservation()  # nothing in flight; the buffer holds every group
        in_flight = sched.ledger.uids(IN_FLIGHT)
        sched.close()
        return accepted, in_flight, len(sched.buffer)

    accepted, in_flight, buffered = run_virtual(main())
    assert accepted == 4 and not in_flight and buffered == 8
