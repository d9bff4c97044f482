"""One rank's learner: the policy sharded over the ranks, its state gathered whole to rank 0.

The update runs on every rank over its share of the rows (`GroupRanks`). What leaves the ranks
is whole and in one-process form, so a checkpoint does not depend on the world size it was
written with: the engine's weights and the model's `save_pretrained` export are gathered from
the shards; the optimizer's state is gathered into the index-keyed `state_dict()` one process
writes, and scattered back into shards on load. A run therefore resumes exactly with any
`train.world_size` (2 -> 1, 1 -> 2).

Every method is a collective: all ranks call it, in the same order (trainer/distributed/mirror.py
sees to that); only rank 0 returns or writes what was gathered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from rollover.trainer.checkpoint import load_trainer_state
from rollover.trainer.config import Recipe
from rollover.trainer.distributed.gather import engine_weight_buckets, full
from rollover.trainer.distributed.ranks import GroupRanks
from rollover.trainer.distributed.shard import ShardedPolicy
from rollover.trainer.learner import Learner
from rollover.trainer.policy import Policy


class ShardedLearner(Learner):
    """`Learner` for one rank of the default process group (FSDP2 over all ranks)."""

    def __init__(self, policy: Policy, recipe: Recipe):
        self.rank = dist.get_rank()
        super().__init__(ShardedPolicy(policy), recipe, GroupRanks(device=_collective_device(policy.device)))

    def policy_logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """The sharded forward on these inputs (the weight probe's, the swarm judge's)."""
        device = self.policy.device
        return self.policy.token_logprobs(input_ids.to(device), attention_mask.to(device), temperature)

    def engine_weights(self, cast: bool = True) -> dict[str, Tensor] | None:
        """Gathered bucket by bucket; rank 0 keeps them (in the compute dtype), the others drop them."""
        weights: dict[str, Tensor] = {}
        for bucket in engine_weight_buckets(self.policy, cast=cast):
            if self.rank == 0:
                weights.update(bucket)
        return weights if self.rank == 0 else None

    def save_pretrained(self, folder: Path) -> None:
        """What `Policy.save_pretrained` writes for one process: rank 0 writes, from gathered shards."""
        policy: Policy = self.policy.policy
        state = policy.model.state_dict()
        if self.policy.lora:
            adapter = _gathered({name: t for name, t in state.items() if "lora_" in name})
            served = self.engine_weights(cast=True)
            if self.rank == 0:
                policy.model.save_pretrained(folder / "adapter", state_dict=adapter)
                policy.base.save_pretrained(folder, state_dict=served)
        else:
            masters = _gathered(state)
            if self.rank == 0:
                policy.model.save_pretrained(folder, state_dict=masters)
        if self.rank == 0:
            policy.tokenizer.save_pretrained(folder)

    def optimizer_state(self) -> dict[str, Any]:
        """The one-process `optimizer.state_dict()`: every sharded moment gathered whole."""
        state = self.optimizer.state_dict()
        state["state"] = {index: {key: full(value, None) if isinstance(value, Tensor) else value
                                  for key, value in moments.items()}
                          for index, moments in state["state"].items()}
        return {"optimizer": state, "lr_schedule": self.lr_schedule.state_dict()}

    def load_optimizer_state(self, checkpoint: Path) -> None:
        """A checkpoint's optimizer state (written with any world size), scattered into shards."""
        state = load_trainer_state(checkpoint)
        saved = state["optimizer"]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, moments in saved["state"].items():
            param = params[int(index)]
            if not isinstance(param, DTensor):
                continue
            for key, value in moments.items():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    moments[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        self.optimizer.load_state_dict(saved)
        self.lr_schedule.load_state_dict(state["lr_schedule"])


def _gathered(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor whole (a collective per tensor), tied ones gathered once and kept shared."""
    done: dict[int, Tensor] = {}
    for tensor in state.values():
        if id(tensor) not in done:
            done[id(tensor)] = full(tensor, None)
    return {name: done[id(tensor)] for name, tensor in state.items()}


def _collective_device(device: torch.device) -> torch.device:
    """Where the small collectives of `GroupRanks` run: the rank's GPU for NCCL, else the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")
