"""Every weight sync checked, none can hang: the real CPU engine, and a real `rl-train`.

The check (rollout/weights/weight_check.py) compares the engine's prompt log-probs of a fixed probe with
the trainer policy's after each load. Transports that skip, hang or fail half-way stand in for
broken ones; each test ends with the shared engine idle on its original weights.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_signals import Run, recipe_args, rl_train_lines, trained_steps

from rollover.rollout.engine import WeightLoadError
from rollover.rollout.weights.weight_check import CANCEL_GRACE_S, CheckedWeightSync, WeightSyncFailed
from rollover.trainer.config import Recipe
from rollover.trainer.policy import Policy

pytestmark = pytest.mark.integration


@pytest.fixture
def policy():
    """The built-in policy: what the shared engine serves."""
    return Policy(Recipe().model, Recipe().train.lora)


def step_weights(policy: Policy, lr: float = 1e-5) -> None:
    """What one AdamW step of learning rate `lr` does: about lr per parameter (this moves the
    built-in model's probe by ~3.6e-4 nats/token)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(lr * torch.sign(torch.randn(p.shape, generator=generator)))


class Skipping:
    async def push(self, llm, named_tensors) -> None:
        return None


class Hanging:
    async def push(self, llm, named_tensors) -> None:
        await asyncio.Event().wait()


class HalfThenFail:
    """Loads the first half of the tensors through the real transport, then fails."""

    def __init__(self, real) -> None:
        self.real = real

    async def push(self, llm, named_tensors) -> None:
        pairs = list(named_tensors)
        await self.real.push(llm, pairs[: len(pairs) // 2])
        raise RuntimeError("the link dropped half-way")


def checked_start(engine, run, policy, sync):
    """The engine idle and checked at the start, the policy one update further; the engine's own
    transport, for the test to put back."""
    run(engine.wait_idle())
    run(sync.verify(engine.policy_version, "start"))
    step_weights(policy)
    return engine.weight_transport


def test_a_transport_that_skips_is_caught_at_the_first_sync(engine, run, policy, restore_engine, monkeypatch):
    sync = CheckedWeightSync(engine, policy, timeout_s=60)
    real = checked_start(engine, run, policy, sync)
    monkeypatch.setattr(engine, "weight_transport", Skipping())
    with pytest.raises(WeightSyncFailed, match="step 1's weight sync: engine .* still serves the previous "
                                               "weights .* did not update it"):
        run(sync.load(lambda: engine.update_weights(policy.engine_weights()), "step 1's weight sync"))
    monkeypatch.setattr(engine, "weight_transport", real)
    metrics = run(sync.load(lambda: engine.update_weights(policy.engine_weights()), "step 1 again"))
    assert metrics["weights/fingerprint_ok"] == 1.0 and metrics["weights/probe_gap"] < 1e-4


def test_a_hanging_load_is_stopped_at_the_deadline_and_a_full_load_recovers(
        engine, run, policy, restore_engine, monkeypatch):
    sync = CheckedWeightSync(engine, policy, timeout_s=2)
    real = checked_start(engine, run, policy, sync)
    monkeypatch.setattr(engine, "weight_transport", Hanging())
    started = time.monotonic()
    with pytest.raises(WeightSyncFailed, match=r"did not finish within 2 s \(rollout.weight_load_timeout_s\)"):
        run(sync.load(lambda: engine.update_weights(policy.engine_weights()), "step 1's weight sync"))
    assert time.monotonic() - started < 2 + CANCEL_GRACE_S  # the cancelled load cleaned up in time
    with pytest.raises(WeightLoadError, match="load a full set of weights again"):
        run(engine.generate([5, 6, 7], 4))  # the gate is open again; the weights are marked broken
    monkeypatch.setattr(engine, "weight_transport", real)
    assert run(sync.load(lambda: engine.update_weights(policy.engine_weights()), "retry"))[
        "weights/fingerprint_ok"] == 1.0


def test_a_push_that_fails_half_way_is_followed_by_a_good_one(engine, run, policy, restore_engine, monkeypatch):
    sync = CheckedWeightSync(engine, policy, timeout_s=60)
    real = checked_start(engine, run, policy, sync)
    monkeypatch.setattr(engine, "weight_transport", HalfThenFail(real))
    with pytest.raises(RuntimeError, match="half-way"):
        run(sync.load(lambda: engine.update_weights(policy.engine_weights()), "step 1's weight sync"))
    with pytest.raises(WeightLoadError):
        run(engine.generate([5, 6, 7], 4))
    monkeypatch.setattr(engine, "weight_transport", real)
    assert run(sync.load(lambda: engine.update_weights(policy.engine_weights()), "retry"))[
        "weights/fingerprint_ok"] == 1.0
    assert run(engine.generate([5, 6, 7], 4)).token_ids


def test_skip_weight_push_failpoint_stops_rl_train_at_that_steps_check(tmp_path):
    out = tmp_path / "run"
    args = recipe_args(out, "train.steps=3", "train.save_every=1")
    train = Run(args, env={"ROLLOVER_FAILPOINT": "skip_weight_push:2"})
    train.wait_for(lambda: trained_steps(out) >= 1)  # records the run's processes, engine included
    status, output, left = train.finish(timeout=300)
    lines = rl_train_lines(output)
    assert status == 1, output[-3000:]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert lines[0].startswith("rl-train: stopped at step 1: step 2's weight sync: engine ")
    assert "still serves the previous weights" in lines[0]
    assert f"last checkpoint {out / 'checkpoints' / 'step-000001'} is intact" in lines[0]
    assert not left, left
