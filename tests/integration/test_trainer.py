"""The training loop on the shared real engine: failing rewards, non-finite losses, weight sync."""

import math

import pytest
import torch
from safetensors.torch import load_file

from rollover.tasks.registry import build_task
from rollover.tasks.rewards import RewardRunner
from rollover.trainer.checkpoint import latest_checkpoint, load_trainer_state
from rollover.trainer.config import Recipe
from rollover.trainer.build import build_trainer
from rollover.trainer.loop import TrainingStopped
from rollover.trainer.policy import Policy
from rollover.trainer.tracking import Tracker

pytestmark = pytest.mark.integration
JUDGE = "tests.integration.reward_fns:judge_down"


def small_recipe(tmp_path, **train) -> Recipe:
    return Recipe.model_validate({
        "model": {"max_model_len": 256},
        "task": {"eval_size": 16, "rewards": [{"fn": "correctness"}, {"fn": JUDGE}],
                 "max_reward_failure_steps": 10},  # the judge fails every step of this test
        "rollout": {"groups_per_step": 3, "group_size": 4, "max_tokens": 40},
        "algo": {"dynamic_sampling": False},
        "train": {"output_dir": str(tmp_path), "lr": 1e-4, **train},
        "tracking": {"wandb": "disabled"},
    })


def test_failing_reward_and_nan_loss(engine, run, tmp_path, restore_engine):
    recipe = small_recipe(tmp_path, max_bad_steps=1)
    task = build_task(recipe.task)
    rewards = RewardRunner.from_config(recipe.task, task)
    policy = Policy(recipe.model, recipe.train.lora)
    tracker = Tracker(recipe.tracking, tmp_path, {}, "test")
    trainer = build_trainer(recipe, task, rewards, policy, engine, tracker, tmp_path)
    try:
        start_version = engine.policy_version
        first = run(trainer.train_step())
        failed_after_first = rewards.failures[JUDGE]
        second = run(trainer.train_step())
        # The judge that raises is scored as failed for every scored sample (at least the 3x4
        # returned ones per step, each scored once: a buffered group keeps its scores), counted
        # in the metrics, and never crashes the run.
        assert first["reward_failures"] == failed_after_first >= 12
        # Per step and function too. A step's figure counts the samples scored during it, which
        # need not be the samples it trains on: a group finished early in step 1 and kept for
        # step 2 was scored (and counted) in step 1, so only the sum over steps is bounded below.
        per_step = [first[f"reward_failures/{JUDGE}"], second[f"reward_failures/{JUDGE}"]]
        assert per_step[0] >= 12 and sum(per_step) >= 2 * 12
        assert sum(per_step) <= rewards.failures[JUDGE]  # scoring may go on after a step reports
        assert first["reward_failures/correctness"] == second["reward_failures/correctness"] == 0
        assert second["reward_failures"] >= 2 * 12 and second["reward_failures"] > failed_after_first
        assert engine.policy_version == start_version + 2  # each step's weights reached the engine
        assert math.isfinite(first["loss"]) and first["time/weight_sync"] > 0
        assert 0 <= first["time/gc"] < first["time/step"]
        assert "kl" not in first  # only the reference KL is logged as `kl`, and kl_coef is 0
        checkpoint = run(trainer.save())

        with torch.no_grad():  # a blown-up weight: the next loss is NaN
            next(policy.model.parameters()).fill_(float("nan"))
        run(trainer.train_step())
        assert trainer.bad_steps == 1 and engine.policy_version == start_version + 2  # skipped, not synced
        with pytest.raises(TrainingStopped, match="max_bad_steps"):
            run(trainer.train_step())
    finally:
        trainer.scheduler.close()
        rewards.close()
    # The checkpoint written before the failure is intact and finite.
    assert latest_checkpoint(tmp_path) == checkpoint
    assert load_trainer_state(checkpoint)["step"] == 2
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_lora_engine_weights_are_merged(tmp_path):
    recipe = Recipe.model_validate({"train": {"lora": {"enabled": True, "r": 4, "alpha": 8}}})
    policy = Policy(recipe.model, recipe.train.lora)
    plain = Policy(recipe.model, Recipe().train.lora)
    with torch.no_grad():  # LoRA's B starts at zero; give it values so the merge shows
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    merged = policy.engine_weights()
    assert set(merged) == set(plain.model.state_dict())  # checkpoint names, no adapter keys
    layer = policy.base.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer.weight + (8 / 4) * b @ a  # W + (alpha / r) B A
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    # The adapter is unmerged again afterwards: the trainable model is unchanged.
    torch.testing.assert_close(layer.base_layer.weight, plain.base.model.layers[0].self_attn.q_proj.weight)


def test_too_many_rejections_stops_rl_train_in_one_line(tmp_path):
    """A reward that never varies: every group is rejected, and rl-train stops cleanly."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "rollover.trainer.cli", str(root / "recipes/grpo_math.yaml"),
         f"train.output_dir={tmp_path / 'run'}", "tracking.wandb=disabled", "task.eval_size=8",
         "rollout.groups_per_step=2", "rollout.group_size=2", "rollout.max_tokens=24",
         "task.rewards=[{fn: 'tests.integration.reward_fns:constant'}]",
         "rollout.max_rejections_per_step=3"],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rl-train: stopped at step 0: ") and "rejected" in last
    assert "no checkpoint was written" in last


def test_a_reward_failing_every_sample_stops_rl_train_in_one_line(tmp_path):
    """A reward that always raises is a bug: its first failure is shown, and the run stops."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    fn = "tests.integration.reward_fns:divides_by_zero"
    result = subprocess.run(
        [sys.executable, "-m", "rollover.trainer.cli", str(root / "recipes/grpo_math.yaml"),
         f"train.output_dir={tmp_path / 'run'}", "tracking.wandb=disabled", "task.eval_size=8",
         "rollout.groups_per_step=2", "rollout.group_size=2", "rollout.max_tokens=24",
         "algo.dynamic_sampling=false", "train.steps=10",
         f"task.rewards=[{{fn: correctness}}, {{fn: '{fn}'}}]", "task.max_reward_failure_steps=2"],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    first = (f"reward {fn} failed: ZeroDivisionError: division by zero "
             f"(later failures are counted in reward_failures/{fn})")
    assert result.stderr.count(first) == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"rl-train: stopped at step 2: reward {fn} failed on every sample for 2 steps in "
                    f"a row (task.max_reward_failure_steps=2); last error: ZeroDivisionError: division "
                    f"by zero; no checkpoint was written"), result.stderr
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "loss" in s]
    assert [s["step"] for s in trained] == [1, 2]
    # Each of the 2 x 4 returned samples was scored (and failed) once, in its step or an earlier
    # one (a surplus group scored in step 1 may be returned in step 2); every step failed some.
    assert sum(s[f"reward_failures/{fn}"] for s in trained) >= 8
    assert all(s[f"reward_failures/{fn}"] >= 1 and s["reward_failures/correctness"] == 0 for s in trained)
