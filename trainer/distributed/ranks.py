"""`Ranks` over a torch.distributed process group: the global normalisers of a sharded update.

Each rank's loss divides by the whole mini-batch's counts (summed over ranks here), and the
gradients are *summed* over ranks (trainer/distributed/shard.py sets FSDP's reduction to a sum),
so the ranks' gradients add up to the one-process gradient of the whole mini-batch exactly.
The gradient-norm clip needs nothing here: `clip_grad_norm_` on FSDP's DTensor gradients
reduces the norm over the shards of every rank (the parity test clips and compares the norm).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rollover.trainer.batch import Row
from rollover.trainer.distributed.batch_split import rank_share
from rollover.trainer.update import Ranks


class GroupRanks(Ranks):
    """The ranks of `group` (None: the default group); `device` carries the collectives' tensors
    (CPU for gloo, the rank's GPU for NCCL)."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = device or torch.device("cpu")

    def _reduce(self, value: float | int, op: dist.ReduceOp, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.tensor([value], dtype=dtype, device=self.device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def share(self, rows: list[Row]) -> list[Row]:
        return rank_share(rows, self.rank, self.size)

    def total(self, count: int) -> int:
        return int(self._reduce(count, dist.ReduceOp.SUM, torch.int64).item())

    def most(self, count: int) -> int:
        return int(self._reduce(count, dist.ReduceOp.MAX, torch.int64).item())

    def all_finite(self, finite: bool) -> bool:
        return bool(self._reduce(int(finite), dist.ReduceOp.MIN, torch.int64).item())

    def gather_stats(self, collected: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
        every: list[dict[str, list[tuple[float, float]]] | None] = [None] * self.size
        dist.all_gather_object(every, dict(collected), group=self.group)
        merged: dict[str, list[tuple[float, float]]] = {}
        for stats in every:
            for name, pairs in (stats or {}).items():
                merged.setdefault(name, []).extend(pairs)
        return merged
