"""The recipe's `task` section, and `Section`, the base every recipe section derives from.

`Section` lives here, in the lowest package with a recipe section, so that each package owns its
section (tasks, rollout, swarm, trainer) without importing a package above it
(docs/ARCHITECTURE.md, "Layering"). trainer/config.py composes the sections into a `Recipe`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base for every section: unknown keys are errors, and assignment is validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RewardSpec(Section):
    fn: str = "correctness"  # a registered reward name, or "module:function"
    weight: float = 1.0


class TaskConfig(Section):
    name: Literal["arithmetic", "reasoning_gym", "dataset"] = "arithmetic"
    seed: int = 0
    # arithmetic
    digits_min: int = Field(1, ge=1, le=12)
    digits_max: int = Field(3, ge=1, le=12)
    operands: int = Field(2, ge=2, le=6)  # numbers per problem; the fewest with operands_max
    # None: every problem has `operands` numbers; else each draws its count from operands..this.
    operands_max: int | None = Field(None, ge=2, le=6)
    scratchpad: bool = True
    # reasoning_gym
    gym_dataset: str = "basic_arithmetic"
    gym_config: dict[str, Any] = Field(default_factory=dict)
    # dataset (JSONL, Parquet, or a `datasets` folder saved to disk)
    path: str | None = None
    question_key: str = "question"
    answer_key: str = "answer"
    # prompts and rewards
    prompt_format: Literal["raw", "chat"] = "raw"
    system_prompt: str | None = None
    eval_size: int = Field(64, ge=1)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec()])
    reward_timeout: float = Field(10.0, gt=0)  # seconds per call; an overrunning call is killed
    # Stop the run when a reward function fails on every sample for this many steps in a row.
    max_reward_failure_steps: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        if self.digits_min > self.digits_max:
            raise ValueError("digits_min must not exceed digits_max")
        if self.operands_max is not None and self.operands_max < self.operands:
            raise ValueError("operands_max must not be less than operands")
        if self.name == "dataset" and not self.path:
            raise ValueError("task.path is required when task.name is 'dataset'")
        return self
