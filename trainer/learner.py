"""The learner: the policy and what trains it (optimizer, lr schedule), behind one small interface.

Everything in a run that changes the trained weights or reads them whole goes through a
`Learner`: the update, the weights for the engine, the model's and the optimizer's checkpoint
state. This is the seam data-parallel training plugs into: with `train.world_size` > 1 the
trainer holds a learner whose every call runs on all ranks at once
(trainer/distributed/mirror.py), and nothing else in the loop changes.

`probe_policy` is what reads log-probs outside the update (the weight check's probe, the swarm's
likelihood test of peers' groups): the policy itself here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rollover.trainer.batch import Row
from rollover.trainer.checkpoint import load_trainer_state
from rollover.trainer.config import Recipe
from rollover.trainer.optim import build_lr_schedule, build_optimizer
from rollover.trainer.update import ONE_PROCESS, Ranks, train_on_batch


class Learner:
    """One process (or, with `ranks`, one rank) training `policy` as the recipe says."""

    def __init__(self, policy, recipe: Recipe, ranks: Ranks = ONE_PROCESS):
        self.policy, self.recipe, self.ranks = policy, recipe, ranks
        train = recipe.train
        if recipe.algo.kl_coef > 0:
            policy.enable_reference()
        self.optimizer = build_optimizer(policy.trainable_parameters(), lr=train.lr,
                                         weight_decay=train.weight_decay)
        self.lr_schedule = build_lr_schedule(self.optimizer, train)

    @property
    def probe_policy(self):
        """The policy whose log-probs the weight check and the swarm's judge read."""
        return self.policy

    def update(self, rows: list[Row], *, version: int, step: int) -> dict[str, Any]:
        """Step `step`'s updates on `rows` (trainer/update.py `train_on_batch`)."""
        recipe = self.recipe
        return train_on_batch(self.policy, self.optimizer, self.lr_schedule, rows, recipe.algo, recipe.train,
                              version=version, max_tokens=recipe.rollout.max_tokens,
                              temperature=recipe.rollout.temperature, seed=recipe.train.seed + step,
                              ranks=self.ranks)

    def engine_weights(self, cast: bool = True) -> dict[str, torch.Tensor] | None:
        """The weights the engine serves (`Policy.engine_weights`)."""
        return self.policy.engine_weights(cast=cast)

    def save_pretrained(self, folder: Path) -> None:
        """The model into a checkpoint folder (`Policy.save_pretrained`)."""
        self.policy.save_pretrained(folder)

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's and the lr schedule's checkpoint state."""
        return {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}

    def save_sharded_state(self, folder: Path) -> None:
        """Nothing for one process: its whole optimizer state is in `optimizer_state()`'s dict
        (trainer_state.pt). N ranks write their shards here (trainer/distributed/sharded_learner.py)."""

    def load_optimizer_state(self, checkpoint: Path) -> None:
        """Continue from the optimizer state a checkpoint holds: one process's (in trainer_state.pt)
        or N ranks' DCP shards, loaded whole here without a process group."""
        # Imported here: torch.distributed.checkpoint costs every run ~1 s of start-up otherwise.
        from rollover.trainer.distributed.sharded_state import has_sharded_state, load_sharded_state

        state = load_trainer_state(checkpoint)
        if has_sharded_state(checkpoint):
            load_sharded_state(checkpoint, self.policy.model, self.optimizer, one_process=True)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])

    def close(self) -> None:
        """Release what the learner holds beyond memory (other ranks); nothing for one process."""
