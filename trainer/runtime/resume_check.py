"""Resume checks what it resumes: the recipe against the run's saved `recipe.yaml`.

Some keys give saved state its meaning (the model and tokenizer the weights belong to, the
group size of buffered groups, LoRA's adapter shape, the loss, the task whose prompt cursor the
checkpoint holds); changing them on resume fails late and obscurely, or trains on garbage.
Others (steps, learning rate, cadences, tracking) may change, and are reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rollover.tasks.errors import UsageError

# Dotted prefixes of the keys that must not change on resume.
FROZEN = (
    "model.path", "model.dtype", "task.name", "task.seed", "task.digits_min", "task.digits_max",
    "task.operands", "task.scratchpad", "task.gym_dataset", "task.gym_config", "task.path",
    "task.question_key", "task.answer_key", "task.prompt_format", "task.system_prompt",
    "rollout.group_size", "algo.loss", "train.lora.enabled", "train.lora.r", "train.lora.alpha",
    "train.lora.target_modules",
)
IGNORED = ("train.output_dir", "train.resume")


class ResumeMismatch(UsageError):
    """The recipe changes keys that give the saved state its meaning (one line for the user)."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other leaves are kept whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted != "task.gym_config":
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved value, current value) for every key that differs."""
    before, after = flatten(saved), flatten(current)
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and key not in IGNORED}


def check_resume(output_dir: Path, current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The allowed changes against the saved recipe; ResumeMismatch for the frozen ones."""
    saved_file = output_dir / "recipe.yaml"
    if not saved_file.is_file():
        return {}
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    changes = recipe_changes(saved, current)
    frozen = {k: v for k, v in changes.items() if k.startswith(FROZEN)}
    if frozen:
        listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in frozen.items())
        raise ResumeMismatch(f"cannot resume {output_dir}: {listed} would change the meaning of its "
                             f"saved state; undo {'them' if len(frozen) > 1 else 'it'}, or start a new "
                             f"run in another train.output_dir")
    return changes


def _show(value: Any) -> str:
    return "(unset)" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
