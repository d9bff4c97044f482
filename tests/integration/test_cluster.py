"""Two real CPU vLLM engines in Ray actors on a local Ray cluster, behind one APRIL scheduler.

Expected values come from the tests' own bookkeeping: a spy around each engine handle records
every request (what was sent, its budget, the tokens that came back), so "exactly where the
sample stood" and "on which engine" are checked against what really crossed the wire.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from test_april import FORCED, SpyEngine, Source, check_no_regeneration, config, score

from rollover.rollout.april import AprilScheduler
from rollover.rollout.cluster import EngineFactory, connect
from rollover.rollout.engine import SamplingSettings
from rollover.rollout.pool import EnginePool
from rollover.rollout.settings import EngineSettings
from rollover.trainer.builtin.models import resolve_model_path
from rollover.rollout.config import ClusterConfig

pytestmark = pytest.mark.integration

GREEDY = SamplingSettings(temperature=0.0)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pool(run):
    import ray

    connect("local", num_cpus=4)  # logical CPUs: two engine actors and the driver's tasks
    settings = EngineSettings(model=resolve_model_path("builtin:tiny-math"), max_model_len=256)
    factory = EngineFactory(settings, ClusterConfig(address="local", engines=2))
    async def start_both():
        return await asyncio.gather(factory.start(0), factory.start(1))

    engines = run(start_both())
    pool = EnginePool(engines, replace=factory.start)
    yield pool
    pool.shutdown()
    ray.shutdown()


def spy_on(pool: EnginePool) -> list[SpyEngine]:
    """A spy on each live engine handle (dead ones are replaced with new handles: spy again)."""
    spies = []
    for m in pool.members:
        if not isinstance(m.engine, SpyEngine):
            m.engine = SpyEngine(m.engine)
        spies.append(m.engine)
    return spies


class AllSpies:
    """Every engine's spy as one: a sample's requests on any engine, in submission order."""

    def __init__(self, spies: list[SpyEngine]) -> None:
        self.spies = spies

    def for_sample(self, uid: int, index: int) -> list[dict]:
        mine = re.compile(rf"-g{uid}-s{index}-(\d+)$")  # the trailing counter orders them
        found = [(int(mine.search(k).group(1)), r) for spy in self.spies for k, r in spy.requests.items()
                 if mine.search(k)]
        return [r for _, r in sorted(found, key=lambda pair: pair[0])]


def test_exactly_n_and_conservation_across_two_engines(pool, run, tokenizer):
    spies = spy_on(pool)
    rng = random.Random(5)
    budgets = defaultdict(lambda: rng.choice([4, 8, 16, 40]))
    budget_of = lambda g, i: budgets[(g.uid, i)]  # noqa: E731
    sched = AprilScheduler(pool, config(groups_per_step=4, group_size=2, over_provision=2.0),
                           Source(tokenizer), score, sampling=FORCED, budget_fn=budget_of)
    try:
        for _ in range(4):
            result = run(sched.step())
            assert len(result.groups) == 4 and all(g.finished and g.scored for g in result.groups)
            for g in result.groups:
                check_no_regeneration(AllSpies(spies), g, budget_of)
            sched.check_conservation()
            assert result.metrics["rollout/engines_live"] == 2
    finally:
        sched.close()
    served = [len(spy.requests) for spy in spies]
    assert min(served) > 0, f"one engine got no request: {served}"


def test_after_a_sync_both_engines_serve_the_same_version_and_weights(pool, run, tokenizer):
    import ray

    from rollover.trainer.config import LoraConfig, ModelConfig
    from rollover.trainer.policy import Policy

    prompts = [tokenizer.encode(f"{a}+{b}=") for a, b in [(3, 4), (12, 9), (7, 7), (40, 2)]]

    async def greedy_on_each():
        outs = []
        for m in pool.members:
            outs.append([(await m.engine.generate(p, 12, GREEDY)).token_ids for p in prompts])
        return outs

    before = run(greedy_on_each())
    assert before[0] == before[1]  # same model, greedy: the same tokens on both engines
    policy = Policy(ModelConfig(path="builtin:tiny-math", dtype="float32"), LoraConfig())
    generator = torch.Generator().manual_seed(0)
    noisy = {name: t + 0.5 * torch.randn(t.shape, generator=generator) * t.std()
             if t.is_floating_point() and t.numel() > 1 else t
             for name, t in policy.engine_weights().items()}
    version = run(pool.update_weights(noisy))
    after = run(greedy_on_each())
    assert after[0] == after[1], "the two engines serve different weights after one sync"
    assert after[0] != before[0], "the sync did not change the weights the engines serve"
    actual = [ray.get(m.engine.actor.describe.remote())["policy_version"] for m in pool.members]
    assert actual == [version, version] and pool.policy_version == version
    run(pool.update_weights(policy.engine_weights()))  # back to the model the others expect
    assert run(greedy_on_each()) == [before[0], before[0]]


def test_every_engine_actor_answers_the_weight_check_and_a_stale_one_is_named(pool, run):
    from rollover.rollout.weights.weight_check import CheckedWeightSync, WeightSyncFailed
    from rollover.trainer.config import LoraConfig, ModelConfig
    from rollover.trainer.policy import Policy

    policy = Policy(ModelConfig(path="builtin:tiny-math", dtype="float32"), LoraConfig())
    sync = CheckedWeightSync(pool, policy, timeout_s=60)
    readings = run(pool.weight_probe(sync.ids))
    assert [r.engine.split(":")[0] for r in readings] == [m.engine.name for m in pool.members]
    run(sync.verify(pool.policy_version, "start"))
    with torch.no_grad():  # one lr-1e-5 AdamW-sized step
        generator = torch.Generator().manual_seed(1)
        for p in policy.model.parameters():
            p.add_(1e-5 * torch.sign(torch.randn(p.shape, generator=generator)))
    assert run(sync.load(lambda: pool.update_weights(policy.engine_weights()), "step 1"))[
        "weights/fingerprint_ok"] == 1.0
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(1e-5)
    pool.policy_version = pool.policy_version + 1  # the version moves, the weights do not
    with pytest.raises(WeightSyncFailed, match=f"step 2: engine {pool.members[0].engine.name}: .* still serves"):
        run(sync.verify(pool.policy_version, "step 2"))
    run(pool.update_weights(Policy(ModelConfig(path="builtin:tiny-math", dtype="float32"),
                                   LoraConfig()).engine_weights()))  # back to the model the others expect


def test_an_engine_killed_mid_step_hands_its_groups_to_the_other_and_comes_back(pool, run, tokenizer):
    import ray

    spies = spy_on(pool)
    for spy in spies:
        spy.requests.clear()
    budgets = defaultdict(lambda: 160)  # long: the kill lands while every group is generating
    budget_of = lambda g, i: budgets[(g.uid, i)]  # noqa: E731
    sched = AprilScheduler(pool, config(groups_per_step=4, group_size=2, over_provision=1.0, max_tokens=160),
                           Source(tokenizer, start=10_000), score, sampling=FORCED, budget_fn=budget_of)
    victim = pool.members[0]
    dead_actor, dead_pid = victim.engine.actor, victim.engine.inner.pid

    async def kill_once_both_stream():
        while not all(len(s.requests) and any(r["got"] for r in s.requests.values()) for s in spies):
            await asyncio.sleep(0.02)
        ray.kill(dead_actor, no_restart=True)

    async def step_with_a_kill():
        killer = asyncio.ensure_future(kill_once_both_stream())
        result = await sched.step()
        await killer
        return result

    try:
        result = run(step_with_a_kill())
        assert len(result.groups) == 4 and all(g.finished for g in result.groups)
        assert result.metrics["rollout/migrations"] > 0
        for g in result.groups:
            check_no_regeneration(AllSpies(spies), g, budget_of)
            assert all(len(s.response_ids) == 160 for s in g.samples)  # forced lengths: all there
        sched.check_conservation()
        assert sorted(g.uid for g in result.groups) == list(range(10_000, 10_004))
        # The dead engine's slot comes back with the pool's weights and version, and serves.
        run(asyncio.wait_for(pool.settle(), 300))
        assert pool.revivals == 1 and all(m.alive for m in pool.members)
        back = pool.members[0].engine
        assert back.actor != dead_actor and back.pid != dead_pid
        assert back.policy_version == pool.policy_version
        prompt = tokenizer.encode("3+4=")
        assert run(back.generate(prompt, 8, GREEDY)).token_ids == \
            run(pool.members[1].engine.generate(prompt, 8, GREEDY)).token_ids
        result = run(sched.step())  # and the next step runs on both again
        assert len(result.groups) == 4 and result.metrics["rollout/engines_live"] == 2
        sched.check_conservation()
    finally:
        sched.close()


def _rl_train(out, *extra: str) -> dict:
    args = [str(ROOT / "recipes/grpo_math.yaml"), "train.steps=20", "train.eval_every=20",
            "task.eval_size=256", "train.save_every=1000", "tracking.wandb=disabled",
            f"train.output_dir={out}", *extra]
    done = subprocess.run([sys.executable, "-m", "rollover.trainer.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_rl_train_with_two_engine_actors_learns_as_well_as_with_one(tmp_path):
    # rl-train starts a Ray cluster of its own (`cluster.address=local`), beside the fixture's.
    one = _rl_train(tmp_path / "one")
    two = _rl_train(tmp_path / "two", "cluster.address=local", "cluster.engines=2", "cluster.placement=colocated")
    gains = [s["eval_accuracy_last"] - s["eval_accuracy_first"] for s in (one, two)]
    # Same start (same weights, same held-out set); 20 steps move the demo ~8 points on 256
    # problems, whose sampling noise is ~3 points: two engines must learn, and not fall behind.
    assert one["eval_accuracy_first"] == two["eval_accuracy_first"]
    assert gains[1] >= 0.03, gains
    assert gains[1] >= gains[0] - 0.06, gains
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(m.get("rollout/engines_live") == 2 for m in metrics if "rollout/engines_live" in m)
    assert sum("rollout/engines_live" in m for m in metrics) == 20


def test_ray_outlives_the_thread_that_started_it():
    # Ray ties its processes to the thread that started them (a parent-death signal): started
    # from rl-train's short-lived engine-start thread, its GCS died and the run with it.
    code = (
        "import threading, time, psutil\n"
        "from rollover.rollout.cluster import connect, disconnect\n"
        "starter = threading.Thread(target=connect, args=('local',), kwargs={'num_cpus': 1})\n"
        "starter.start(); starter.join(); time.sleep(3)\n"
        "names = [p.name() for p in psutil.Process().children(recursive=True)]\n"
        "print('gcs alive:', any('gcs_server' in n for n in names), flush=True)\n"
        "disconnect()\n"
        "time.sleep(1)\n"
        "names = [p.name() for p in psutil.Process().children(recursive=True)]\n"
        "print('gcs after disconnect:', any('gcs_server' in n for n in names), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "gcs alive: True" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "gcs after disconnect: False" in done.stdout, done.stdout
