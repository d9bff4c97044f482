"""What each of 2 spawned ranks runs for tests/unit/test_sharded_resume.py (importable by spawn)."""

from __future__ import annotations

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


def rank_main(rank: int, world_size: int, port: int, folder: str, rows_path: str) -> None:
    """For each of full fine-tune and LoRA: (a) fresh -> update(rows 1) -> checkpoint `ranks-*`;
    (b) from the one-process checkpoint `single-*` -> update(rows 2). Rank 0 saves (b)'s weights."""
    import torch.distributed as dist

    from rollover.trainer.distributed.sharded_learner import ShardedLearner
    from rollover.trainer.run import load_checkpoint_weights

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=240))
    rows = torch.load(rows_path, weights_only=False)
    out = Path(folder)
    results = {}
    try:
        for kind, lora in (("full", False), ("lora", True)):
            torch.manual_seed(0)  # the adapter's init, as the one-process run's
            r = recipe(lora)
            learner = ShardedLearner(Policy(r.model, r.train.lora, torch.device("cpu")), r)
            learner.update(rows[0], version=0, step=0)
            state = learner.optimizer_state()  # a collective: every rank
            save_checkpoint(out / f"ranks-{kind}", 1, learner, state, keep=1) if rank == 0 else \
                learner.save_pretrained(out / "unused")  # the other ranks join the gather
            dist.barrier()
            policy = Policy(r.model, r.train.lora, torch.device("cpu"))
            single = out / f"single-{kind}" / "checkpoints" / "step-000001"
            load_checkpoint_weights(policy, single)
            resumed = ShardedLearner(policy, r)
            resumed.load_optimizer_state(single)
            resumed.update(rows[1], version=1, step=1)
            results[kind] = weights(resumed)
        if rank == 0:
            torch.save(results, out / "ranks-results.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
