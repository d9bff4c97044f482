"""One rank's learner: the policy sharded over the ranks; checkpoints in DCP shards plus a whole export.

The update runs on every rank over its share of the rows (`GroupRanks`). The engine's weights
and the model's `save_pretrained` export (what transformers and vLLM load) are gathered whole
from the shards to rank 0, layer by layer. The optimizer's state never is: each rank writes its
own shards with torch.distributed.checkpoint (`save_sharded_state`), which DCP reshards on load,
so a run resumes exactly with any `train.world_size` (2 -> 1, 1 -> 2, 2 -> 2). A one-process
checkpoint (its optimizer state whole in trainer_state.pt) is scattered into shards on load.

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
from rollover.trainer.distributed.sharded_state import (has_sharded_state, load_sharded_state,
                                                        save_sharded_state)
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
        """Only the lr schedule's (the same on every rank): the optimizer's state is written as
        each rank's shards by `save_sharded_state`, never gathered."""
        return {"lr_schedule": self.lr_schedule.state_dict()}

    def save_sharded_state(self, folder: Path) -> None:
        """This rank's shards of the trainable weights and the optimizer's state, and its RNG,
        into `folder/dcp` (trainer/distributed/sharded_state.py)."""
        save_sharded_state(folder, self.policy.model, self.optimizer, self.rank)

    def load_optimizer_state(self, checkpoint: Path) -> None:
        """A checkpoint's optimizer state, written with any world size: N ranks' DCP shards
        (resharded by DCP), or one process's index-keyed state, scattered into shards here."""
        state = load_trainer_state(checkpoint)
        if has_sharded_state(checkpoint):
            load_sharded_state(checkpoint, self.policy.model, self.optimizer, self.rank)
        else:
            self._load_one_process_state(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])

    def _load_one_process_state(self, saved: dict[str, Any]) -> None:
        """One process's `optimizer.state_dict()` (parameters by index, in the same order here),
        each whole moment cut into this rank's shard."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, moments in saved["state"].items():
            param = params[int(index)]
            if not isinstance(param, DTensor):
                continue
            for key, value in moments.items():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    moments[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        self.optimizer.load_state_dict(saved)


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
