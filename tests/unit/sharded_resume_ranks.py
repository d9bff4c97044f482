"""What each of 2 spawned ranks runs for tests/unit/test_sharded_resume.py (importable by spawn)."""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

import torch

from rollover.trainer.checkpoint import save_checkpoint
from rollover.trainer.config import Recipe
from rollover.trainer.policy import Policy

RECIPE = {"model": {"path": "builtin:tiny-math"},
          "train": {"lr": 3e-3, "weight_decay": 0.01, "micro_batch_tokens": 48, "updates_per_batch": 2},
          "rollout": {"max_tokens": 20}, "algo": {"loss": "grpo"}}


def recipe(lora: bool) -> Recipe:
    settings = {**RECIPE, "train": {**RECIPE["train"], "lora": {"enabled": lora, "r": 4, "alpha": 8}}}
    return Recipe.model_validate(settings)


def weights(learner) -> dict[str, torch.Tensor]:
    found = learner.engine_weights(cast=False)
    return None if found is None else {name: t.clone() for name, t in found.items()}


def moment_gathers(optimizer: torch.optim.Optimizer):
    """A context that records each `full_tensor()` of one of `optimizer`'s sharded moments (by
    the storage of its local shard, which a detached view shares): a gather of the optimizer state."""
    from torch.distributed.tensor import DTensor

    storages = {v._local_tensor.untyped_storage().data_ptr() for moments in optimizer.state.values()
                for v in moments.values() if isinstance(v, DTensor) and v._local_tensor.numel() > 0}

    @contextlib.contextmanager
    def recording():
        gathered: list[tuple[int, ...]] = []
        original = DTensor.full_tensor

        def full_tensor(self, *args, **kwargs):
            local = self._local_tensor
            if local.numel() > 0 and local.untyped_storage().data_ptr() in storages:
                gathered.append(tuple(self.shape))
            return original(self, *args, **kwargs)

        DTensor.full_tensor = full_tensor
        try:
            yield gathered
        finally:
            DTensor.full_tensor = original

    return len(storages), recording()


def rank_main(rank: int, world_size: int, port: int, folder: str, rows_path: str) -> None:
    """For each of full fine-tune and LoRA, driven from rank 0 through the mirror as rl-train does:
    (a) fresh -> update(rows 1) -> checkpoint `ranks-*` (recording any gather of the optimizer's
    moments on rank 0); (b) from the one-process checkpoint `single-*` -> update(rows 2) (1 -> 2);
    (c) from the ranks' own checkpoint -> update(rows 2) (2 -> 2). Rank 0 saves the results."""
    import torch.distributed as dist

    from rollover.trainer.distributed.mirror import STOP, Channel, Followers, LeaderLearner, follow
    from rollover.trainer.distributed.sharded_learner import ShardedLearner
    from rollover.trainer.run import load_checkpoint_weights

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=240))
    channel = Channel(dist.new_group(backend="gloo"))
    rows = torch.load(rows_path, weights_only=False)
    out = Path(folder)
    results = {}

    def drive(learner, steps):
        """Rank 0 runs `steps(leader)`, every call mirrored to the other ranks, which follow."""
        if rank != 0:
            return follow(learner, channel)
        try:
            return steps(LeaderLearner(learner, channel, Followers([])))
        finally:
            channel.send((STOP, (), {}))

    def resume(start: Path):
        def steps(leader):
            leader.load_optimizer_state(start)
            leader.update(rows[1], version=1, step=1)
            return weights(leader)
        return steps

    try:
        for kind, lora in (("full", False), ("lora", True)):
            torch.manual_seed(0)  # the adapter's init, as the one-process run's
            r = recipe(lora)
            learner = ShardedLearner(Policy(r.model, r.train.lora, torch.device("cpu")), r)

            def first(leader):
                leader.update(rows[0], version=0, step=0)
                moments, recording = moment_gathers(learner.optimizer)
                with recording as gathered:
                    save_checkpoint(out / f"ranks-{kind}", 1, leader, leader.optimizer_state(), keep=1,
                                    write_shards=leader.save_sharded_state)
                return {"moments": moments, "gathered": gathered}

            results[f"{kind}-gathers"] = drive(learner, first)
            for name, start in ((kind, out / f"single-{kind}"), (f"{kind}-2to2", out / f"ranks-{kind}")):
                start = start / "checkpoints" / "step-000001"
                policy = Policy(r.model, r.train.lora, torch.device("cpu"))
                load_checkpoint_weights(policy, start)
                results[name] = drive(ShardedLearner(policy, r), resume(start))
        if rank == 0:
            torch.save(results, out / "ranks-results.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
