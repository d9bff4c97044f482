"""The check after every weight load (rollout/weights/weight_check.py), without an engine.

`ServingModel` stands in for an engine: a real transformers model that serves whatever its
transport loaded into it and answers the probe with its own forward pass, so trainer and
"engine" numerics are independent computations. The real-engine versions of these tests are in
tests/integration/test_weight_check.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types

import pytest
import torch

from rollover.rollout.weights import weight_check
from rollover.rollout.engine_api import SingleEngine
from rollover.rollout.pool import EnginePool
from rollover.rollout.weights.weight_check import (AGREE_TOL, MOVED_FLOOR, CheckedWeightSync,
                                                   EngineReading, WeightCheck, WeightSyncFailed,
                                                   probe_ids, within)
from rollover.trainer.runtime import failpoints
from rollover.trainer.config import LoraConfig, ModelConfig
from rollover.trainer.policy import Policy


class LoadAll:
    """A transport that loads every tensor."""

    async def push(self, engine, named_tensors) -> None:
        engine.model.load_state_dict(dict(named_tensors))


class Skip:
    """A transport that reports success and changes nothing."""

    async def push(self, engine, named_tensors) -> None:
        return None


class Hang:
    """A transport that never returns (and, if `stubborn`, ignores its first cancellation)."""

    def __init__(self, stubborn: bool = False) -> None:
        self.stubborn = stubborn

    async def push(self, engine, named_tensors) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not self.stubborn:
                raise
            await asyncio.sleep(3600)


class ServingModel(SingleEngine):
    """An engine stand-in: serves its own model; `weight_probe` runs that model."""

    def __init__(self, path: str, name: str, transport=None) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.name, self.transport = name, transport or LoadAll()
        self.policy_version, self.max_model_len, self.errored = 0, 128, False
        self.active_requests: set[str] = set()

    async def update_weights(self, weights, version=None, keep_requests=False, recompute_kv=False) -> int:
        await self.transport.push(self, weights.items() if hasattr(weights, "items") else weights)
        self.policy_version = self.policy_version + 1 if version is None else int(version)
        return self.policy_version

    async def weight_probe(self, token_ids):
        ids = torch.tensor([token_ids])
        with torch.no_grad():
            logits = self.model(ids).logits[0, :-1].double()
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        return [EngineReading(self.name, self.policy_version, logprobs.tolist())]


@pytest.fixture
def policy(tiny_model):
    return Policy(ModelConfig(path=tiny_model, dtype="float32"), LoraConfig())


def adam_like_step(policy: Policy, lr: float, seed: int = 1) -> None:
    """What one AdamW step of learning rate `lr` does to the weights: about lr per parameter
    (on this random model lr 1e-5 moves the probe by ~8e-5 nats/token, the built-in one's 3.6e-4)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(lr * torch.sign(torch.randn(p.shape, generator=generator)))


def test_probe_ids_are_fixed_and_in_the_vocabulary():
    ids = probe_ids(99)
    assert ids == probe_ids(99) and len(ids) == weight_check.PROBE_LENGTH
    assert all(0 <= i < 99 for i in ids) and len(set(ids)) > 10
    with pytest.raises(ValueError):
        probe_ids(1)


def test_a_transport_that_skips_the_update_is_caught_at_the_first_sync(policy, tiny_model):
    async def scenario():
        engine = ServingModel(tiny_model, "e0")
        sync = CheckedWeightSync(engine, policy, timeout_s=30)
        assert (await sync.verify(0, "start"))["weights/fingerprint_ok"] == 1.0
        adam_like_step(policy, 1e-4)  # moves this random model's probe by ~8e-4 nats/token
        engine.transport = Skip()
        with pytest.raises(WeightSyncFailed, match="step 1's weight sync: engine e0 still serves the previous"):
            await sync.load(lambda: engine.update_weights(policy.engine_weights()), "step 1's weight sync")
        engine.transport = LoadAll()  # the same update, loaded: passes
        metrics = await sync.load(lambda: engine.update_weights(policy.engine_weights()), "step 1 again")
        assert metrics["weights/fingerprint_ok"] == 1.0 and metrics["weights/probe_gap"] < 1e-5

    asyncio.run(scenario())


def test_tiny_updates_are_judged_once_they_add_up(policy, tiny_model):
    """Below MOVED_FLOOR one sync cannot tell: a transport that keeps skipping is caught later."""
    async def scenario():
        engine = ServingModel(tiny_model, "e0", Skip())
        sync = CheckedWeightSync(engine, policy, timeout_s=30)
        await sync.verify(0, "start")
        for step in range(1, 50):
            adam_like_step(policy, 3e-6)  # ~2.4e-5 nats/token per step, one direction
            try:
                await sync.load(lambda: engine.update_weights(policy.engine_weights()), f"step {step}")
            except WeightSyncFailed as exc:
                assert "still serves the previous weights" in str(exc)
                return step
        raise AssertionError("a transport that always skips was never caught")

    caught_at = asyncio.run(scenario())
    assert caught_at > 1  # the first update alone was under the floor


def test_an_engine_serving_another_version_or_other_weights_fails():
    check = WeightCheck()
    trainer = [-1.0, -2.0, -3.0]
    with pytest.raises(WeightSyncFailed, match="serves policy version 3, the trainer expects 4"):
        check.verify("sync", 4, [EngineReading("e0", 3, trainer)], trainer)
    off = [x + 2 * AGREE_TOL for x in trainer]
    with pytest.raises(WeightSyncFailed, match=r"differ from the trainer's by 0\.2 nats/token"):
        check.verify("sync", 4, [EngineReading("e0", 4, off)], trainer)
    with pytest.raises(WeightSyncFailed, match="no engine answered"):
        check.verify("sync", 4, [], trainer)


def test_an_engine_that_moved_passes_and_a_new_engine_starts_its_own_reference():
    check = WeightCheck()
    before, after = [-1.0, -2.0], [-1.0 - 1e-3, -2.0 + 1e-3]
    check.verify("start", 0, [EngineReading("e0", 0, before)], before)
    assert check.verify("s1", 1, [EngineReading("e0", 1, after), EngineReading("e1", 1, after)],
                        after)["weights/probe_gap"] == 0.0
    moved_again = [x - 1e-3 for x in after]
    with pytest.raises(WeightSyncFailed, match="engine e1 still serves"):  # e1's reference is `after`
        check.verify("s2", 2, [EngineReading("e0", 2, moved_again), EngineReading("e1", 2, after)],
                     moved_again)


def test_the_stale_verdict_needs_the_trainer_to_have_moved_past_the_floor():
    check = WeightCheck()
    base = [-1.0, -2.0]
    check.verify("start", 0, [EngineReading("e0", 0, base)], base)
    small = [x + MOVED_FLOOR / 2 for x in base]
    check.verify("s1", 1, [EngineReading("e0", 1, base)], small)  # inconclusive: passes
    larger = [x + 2 * MOVED_FLOOR for x in base]
    with pytest.raises(WeightSyncFailed, match="still serves"):
        check.verify("s2", 2, [EngineReading("e0", 2, base)], larger)


def test_a_hanging_load_is_stopped_at_the_deadline(policy, tiny_model, monkeypatch):
    monkeypatch.setattr(weight_check, "CANCEL_GRACE_S", 0.2)

    async def scenario(transport):
        engine = ServingModel(tiny_model, "e0", transport)
        sync = CheckedWeightSync(engine, policy, timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(WeightSyncFailed, match=r"step 3's weight sync did not finish within 0\.5 s "
                                                   r"\(rollout\.weight_load_timeout_s\)"):
            await sync.load(lambda: engine.update_weights(policy.engine_weights()), "step 3's weight sync")
        return time.monotonic() - started

    assert 0.5 <= asyncio.run(scenario(Hang())) < 2  # a shared CI core may be slow
    # One that ignores the cancellation is left behind after the grace, not waited for.
    assert 0.7 <= asyncio.run(scenario(Hang(stubborn=True))) < 3


def test_within_passes_results_and_errors_through():
    async def scenario():
        async def value():
            return 7

        async def fails():
            raise KeyError("x")

        assert await within(value(), 1, "v") == 7
        with pytest.raises(KeyError):
            await within(fails(), 1, "f")

    asyncio.run(scenario())


def test_a_pool_probes_every_engine_and_names_the_one_left_behind(policy, tiny_model):
    async def scenario():
        good, stale = ServingModel(tiny_model, "good"), ServingModel(tiny_model, "stale")
        pool = EnginePool([good, stale])
        sync = CheckedWeightSync(pool, policy, timeout_s=30)
        readings = await pool.weight_probe(sync.ids)
        assert [r.engine for r in readings] == ["good", "stale"]
        await sync.verify(0, "start")
        adam_like_step(policy, 1e-4)
        stale.transport = Skip()
        with pytest.raises(WeightSyncFailed, match="engine stale still serves"):
            await sync.load(lambda: pool.update_weights(policy.engine_weights()), "step 1")

    asyncio.run(scenario())


def test_skip_weight_push_failpoint_skips_only_that_steps_push(monkeypatch):
    monkeypatch.setenv(failpoints.ENV, "skip_weight_push:2")
    pushed = []

    class Transport:
        async def push(self, llm, named_tensors):
            pushed.append(named_tensors)

    trainer = types.SimpleNamespace(step=0, engine=types.SimpleNamespace(weight_transport=Transport()))
    failpoints.arm(trainer)
    for step in range(3):
        trainer.step = step
        asyncio.run(trainer.engine.weight_transport.push(None, f"weights of step {step + 1}"))
    assert pushed == ["weights of step 1", "weights of step 3"]


def test_the_trainers_probe_runs_while_the_engine_loads(policy, tiny_model):
    """The trainer's side of the probe does not wait for the load: a load that cannot finish
    until the trainer's probe has run finishes (and still passes the check)."""
    probed = threading.Event()
    real = policy.token_logprobs

    def token_logprobs(*args, **kwargs):
        out = real(*args, **kwargs)
        probed.set()
        return out

    async def scenario():
        engine = ServingModel(tiny_model, "e0")
        sync = CheckedWeightSync(engine, policy, timeout_s=30)
        await sync.verify(0, "start")
        adam_like_step(policy, 1e-4)
        policy.token_logprobs = token_logprobs

        async def load_after_the_probe():
            waited = await asyncio.to_thread(probed.wait, 10)  # False if the probe waits for the load
            assert waited, "the trainer's probe waited for the load"
            return await engine.update_weights(policy.engine_weights())

        return await sync.load(load_after_the_probe, "step 1")

    assert asyncio.run(scenario())["weights/fingerprint_ok"] == 1.0


def test_a_failed_load_raises_its_own_error_with_the_probe_running(policy, tiny_model):
    async def scenario():
        engine = ServingModel(tiny_model, "e0")
        sync = CheckedWeightSync(engine, policy, timeout_s=30)

        async def failing():
            raise RuntimeError("push failed")

        with pytest.raises(RuntimeError, match="push failed"):
            await sync.load(failing, "step 1")

    asyncio.run(scenario())
