"""The scaling simulation (bench/sim/simulate_scale.py, bench/sim/sim_engine.py): virtual clock, engine
costs worked out by hand, and the real scheduler + pool over simulated engines."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bench.sim import simulate_scale as sim
from bench.sim.sim_engine import SimCosts, SimEngine, SimulationStuck, VirtualTimeLoop, run_virtual
from rollover.rollout.remote import EngineLost

COSTS = SimCosts(base_s=0.01, per_seq_s=0.001, sync_s=0.5)  # round numbers for hand sums


# ---- the virtual clock ---------------------------------------------------------------------------


def test_sleeping_1000_virtual_seconds_costs_no_real_time():
    async def main():
        loop = asyncio.get_running_loop()
        v0, r0 = loop.time(), time.perf_counter()
        await asyncio.sleep(1000)
        slept = loop.time() - v0
        await asyncio.gather(asyncio.sleep(3), asyncio.sleep(5))  # concurrent sleeps overlap
        return slept, loop.time() - v0, time.perf_counter() - r0

    slept, total, real = run_virtual(main())
    assert slept == pytest.approx(1000, abs=1e-6)
    assert total == pytest.approx(1005, abs=1e-6)
    assert real < 0.5


def test_a_simulation_waiting_on_nothing_is_reported_not_hung():
    async def main():
        await asyncio.get_running_loop().create_future()  # nobody will ever set it

    started = time.perf_counter()
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(real_wait_s=0.05)) as runner:
        with pytest.raises(SimulationStuck):
            runner.run(main())
    assert time.perf_counter() - started < 5


# ---- the engine, by hand -------------------------------------------------------------------------


async def _drain(engine, rid, max_tokens, prompt=(1, 2, 3)):
    loop = asyncio.get_running_loop()
    t0, n, last = loop.time(), 0, None
    async for chunk in engine.stream(list(prompt), max_tokens, request_id=rid):
        n += len(chunk.token_ids)
        last = chunk
    return n, last.finish_reason, loop.time() - t0


def test_batch_decode_time_and_abort_keep_completed_iterations():
    async def main():
        loop = asyncio.get_running_loop()
        engine = SimEngine(0, COSTS, chunk=16)
        # 4 requests of 50 tokens together: 50 iterations at 0.01 + 4 * 0.001 = 0.014 s
        together = await asyncio.gather(*(_drain(engine, f"a{i}", 50) for i in range(4)))
        # 4 of 100; two aborted after 10 whole iterations (0.140 s) and a bit of the 11th
        tasks = [asyncio.create_task(_drain(engine, f"b{i}", 100)) for i in range(4)]
        await asyncio.sleep(0.14 + 0.005)
        assert await engine.abort(["b0", "b1", "nobody"]) == 2
        rest = await asyncio.gather(*tasks)
        version = await engine.update_weights(None)
        return together, rest, version, engine.policy_version, loop.time()

    together, rest, version, policy, _ = run_virtual(main())
    assert all(n == 50 and why == "length" and t == pytest.approx(0.7, rel=1e-9)
               for n, why, t in together)
    assert [(n, why) for n, why, _ in rest] == [(10, "aborted")] * 2 + [(100, "length")] * 2
    # the 11th iteration ends with all 4 (0.154 s), then 89 more with 2 running (0.012 s each)
    assert rest[2][2] == pytest.approx(0.154 + 89 * 0.012, rel=1e-9)
    assert version == policy == 1


def test_max_batch_queues_and_early_stop():
    async def main():
        engine = SimEngine(0, COSTS, max_batch=2, stop_at=lambda rid, prompt: 5 if rid == "s" else 10**6)
        return await asyncio.gather(_drain(engine, "x", 20), _drain(engine, "y", 20),
                                    _drain(engine, "s", 20))

    (nx, wx, tx), (ny, wy, ty), (ns, ws, ts) = run_virtual(main())
    # x and y run 20 iterations at 0.012; s queues until they leave, then 5 alone at 0.011
    assert (nx, wx, ny, wy) == (20, "length", 20, "length")
    assert tx == pytest.approx(20 * 0.012) and ty == pytest.approx(20 * 0.012)
    assert (ns, ws) == (5, "stop") and ts == pytest.approx(20 * 0.012 + 5 * 0.011)


def test_a_dead_engine_ends_its_streams_with_engine_lost():
    async def main():
        engine = SimEngine(0, COSTS, die_at=0.1)
        with pytest.raises(EngineLost):
            await _drain(engine, "a", 100)
        assert engine.errored
        with pytest.raises(EngineLost):
            await engine.abort(["a"])

    run_virtual(main())


# ---- the real scheduler and pool over simulated engines -----------------------------------------


def _args(*extra: str):
    return sim.parse_args(["--no-validate", *extra])


def test_synchronous_rollout_time_is_the_hand_computed_sum_of_iterations():
    """1 engine, no tail (every length L), synchronous: all N*G requests run together for L
    iterations, so a step's rollout lasts L * (base + per_seq * N * G) virtual seconds."""
    length = 40
    args = _args("--dist", "constant", "--median", str(length), "--quantum", "0",
                 "--steps", "3", "--warmup", "0", "--groups-per-engine", "4", "--group-size", "8")
    result = run_virtual(sim.simulate(args, COSTS, engines=1, mode="sync", hetero=False, train_s=0.3))
    expected = length * (0.01 + 0.001 * 4 * 8)  # 40 * 0.042 = 1.68 s
    for step in result["steps"]:
        assert step["rollout_s"] == pytest.approx(expected, rel=0.01)
        assert step["train_s"] == pytest.approx(0.3, rel=1e-6)
        assert step["sync_s"] == pytest.approx(0.5, rel=1e-6)
        assert step["useful_tokens"] == 4 * 8 * length
    assert result["useful_tokens_per_s"] == pytest.approx(4 * 8 * length / (expected + 0.8), rel=0.01)


@pytest.mark.parametrize("mode", ["april", "april_sticky"])
def test_april_over_simulated_engines_returns_n_groups_and_conserves(mode):
    args = _args("--steps", "3", "--warmup", "1", "--groups-per-engine", "4")
    seen = []

    def on_step(sched, pool, rec):
        sched.check_conservation()
        seen.append((rec["groups_returned"], rec["generated_tokens"], rec["useful_tokens"]))

    result = run_virtual(sim.simulate(args, sim.SimCosts(), engines=8, mode=mode, hetero=True,
                                      train_s=0.2, on_step=on_step))
    n = 4 * 8
    assert [g for g, _, _ in seen] == [n] * 4
    assert result["slow_engines"] == 1 and result["in_flight_groups"] == 2 * n
    # every token the engines computed reached the scheduler (aborts deliver what was done)
    assert sum(g for _, g, _ in seen) == sum(s["generated_tokens"] for s in result["steps"])
    assert result["engine_busy_mean"] == pytest.approx(1.0, abs=0.05)  # APRIL keeps engines busy
    assert 0 <= result["waste_fraction"] < 0.5


def test_engine_tokens_match_what_the_scheduler_streamed():
    args = _args("--steps", "2", "--warmup", "1", "--groups-per-engine", "2")
    engines = []

    def on_step(sched, pool, rec):
        engines[:] = [m.engine for m in pool.members]
        on_step.generated += rec["generated_tokens"]

    on_step.generated = 0
    run_virtual(sim.simulate(args, sim.SimCosts(), engines=4, mode="april", hetero=False, train_s=0.1,
                             on_step=on_step))
    assert sum(e.tokens for e in engines) == on_step.generated > 0


def test_deaths_migrate_groups_and_keep_conservation():
    args = _args("--steps", "3", "--warmup", "0", "--groups-per-engine", "4")

    def on_step(sched, pool, rec):
        sched.check_conservation()
        assert rec["groups_returned"] == 16

    result = run_virtual(sim.simulate(args, sim.SimCosts(), engines=4, mode="april", hetero=False,
                                      train_s=0.2, deaths=1, die_at=0.2, revive_s=1.0, on_step=on_step))
    assert sum(s["migrations"] for s in result["steps"]) > 0
    assert result["steps"][-1]["engines_live"] == 4  # the replacement joined


def test_quick_run_writes_the_result(tmp_path):
    out = tmp_path / "scaling.json"
    result = sim.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert {r["engines"] for r in saved["runs"]} == {1, 8}
    cal = saved["calibration"]["used"]
    assert cal["base_s"] > 0 and cal["per_seq_s"] > 0 and cal["sync_s"] > 0 and cal["train_s"] > 0
    assert "cpu" in saved["machine"] and "platform" in saved["machine"]
    ratios = saved["summary"]["ratios"]["hetero"]["8"]
    assert ratios["april_over_sync"] > 1  # the long tail costs the synchronous mode
    v = saved["validation_one_engine"]["sync"]
    assert v["simulated_rollout_s_per_step"] == pytest.approx(v["measured_rollout_s_per_step"], rel=0.3)
