"""The composition root: objects of the lower packages built from the trainer's recipe.

rollout/, swarm/ and tasks/ never read the trainer's sections (docs/ARCHITECTURE.md,
"Layering"); what they need from them is resolved here and handed down. `build_trainer` wires
one run: the scorer that the scheduler and the swarm's judge share, the scheduler, the pipeline
and the checked weight sync, handed to a `Trainer` that only trains.
"""

from __future__ import annotations

from typing import Any

from pathlib import Path

from rollover.rollout.april import AprilScheduler
from rollover.rollout.config import RolloutConfig
from rollover.rollout.engine_api import Engine
from rollover.rollout.pipeline import RolloutAhead
from rollover.rollout.settings import EngineSettings
from rollover.rollout.weights.weight_check import CheckedWeightSync
from rollover.swarm.node import SwarmNode
from rollover.tasks.registry import Task
from rollover.tasks.rewards import RewardRunner
from rollover.trainer.builtin.models import resolve_model_path
from rollover.trainer.config import ModelConfig, Recipe, resolve_dtype
from rollover.trainer.external import LocalJudge
from rollover.trainer.group_scorer import GroupScorer, informative
from rollover.trainer.learner import Learner
from rollover.trainer.loop import PromptStream, RolloutParts, Trainer
from rollover.trainer.policy import Policy
from rollover.trainer.tracking import Tracker


def engine_settings(model_cfg: ModelConfig, rollout_cfg: RolloutConfig, *, has_cuda: bool | None = None,
                    **overrides: Any) -> EngineSettings:
    """The engine's settings for the recipe's model and rollout sections: a `builtin:` path
    resolved to its folder, `dtype: auto` to the compute dtype (bfloat16 on CUDA, float32 on
    CPU; `has_cuda` default: detected), overrides (e.g. `model=` a checkpoint) applied last."""
    if has_cuda is None:
        import torch

        has_cuda = torch.cuda.is_available()
    resolved = dict(model=resolve_model_path(model_cfg.path), dtype=resolve_dtype(model_cfg.dtype, has_cuda),
                    max_model_len=model_cfg.max_model_len)
    return EngineSettings.from_rollout(rollout_cfg, has_cuda=has_cuda, **{**resolved, **overrides})


def build_trainer(recipe: Recipe, task: Task, rewards: RewardRunner, policy: Policy, engine: Engine,
                  tracker: Tracker, output_dir: Path, swarm: SwarmNode | None = None,
                  learner: Learner | None = None) -> Trainer:
    """A `Trainer` for one run, its rollout side built from the recipe. `learner`: the policy's
    trainer (default: one process; trainer/distributed/launch.py builds the N-rank one)."""
    rollout = recipe.rollout
    learner = learner or Learner(policy, recipe)
    scorer = GroupScorer(rewards, recipe.algo, rollout.max_tokens)
    prompts = PromptStream(task, policy.tokenizer, recipe, first_index=swarm.problem_offset if swarm else 0)
    scheduler = AprilScheduler(engine, rollout, prompts, scorer, informative if recipe.algo.dynamic_sampling else None,
                               max_rejections_per_step=rollout.max_rejections_per_step)
    parts = RolloutParts(prompts=prompts, scheduler=scheduler,
                         ahead=RolloutAhead(scheduler, rollout.max_async, rollout.interrupt),
                         weight_sync=CheckedWeightSync(engine, learner.probe_policy, rollout.weight_load_timeout_s),
                         judge=LocalJudge(recipe, learner.probe_policy, scorer), learner=learner)
    return Trainer(recipe, task, rewards, policy, engine, tracker, output_dir, parts, swarm)
