"""Resume refuses recipe changes that would change the meaning of the saved state."""

from pathlib import Path

import pytest

from rollover.trainer.config import load_recipe, to_yaml
from rollover.trainer.runtime.resume_check import ResumeMismatch, check_resume

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/grpo_math.yaml"


def saved_run(tmp_path: Path) -> Path:
    (tmp_path / "recipe.yaml").write_text(to_yaml(load_recipe(RECIPE, [f"train.output_dir={tmp_path}"])))
    return tmp_path


def current(*overrides: str) -> dict:
    return load_recipe(RECIPE, list(overrides)).model_dump(mode="json")


def test_frozen_keys_are_listed_and_refused(tmp_path):
    run = saved_run(tmp_path)
    with pytest.raises(ResumeMismatch) as info:
        check_resume(run, current("rollout.group_size=4", "train.lora.enabled=true", "train.steps=500"))
    message = str(info.value)
    assert "rollout.group_size 16 -> 4" in message and "train.lora.enabled false -> true" in message
    assert "train.steps" not in message and "\n" not in message


def test_allowed_changes_are_returned(tmp_path):
    run = saved_run(tmp_path)
    changes = check_resume(run, current("train.steps=500", "train.lr=1e-5", "train.resume=true"))
    assert changes == {"train.lr": (2e-5, 1e-5), "train.steps": (300, 500)}


def test_a_changed_model_or_loss_is_refused(tmp_path):
    run = saved_run(tmp_path)
    with pytest.raises(ResumeMismatch, match=r"algo.loss grpo -> dapo.*model.path builtin:tiny-math -> /m"):
        check_resume(run, current("algo.loss=dapo", "model.path=/m"))
