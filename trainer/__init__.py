"""rollover.trainer: the recipe, `rl-train`, and the training loop that consumes the rollouts.

- `cli` -> `run.run_training`: the command, and the composition root that builds every part
  (`build` resolves what lower packages need from the recipe)
- `config`: the recipe (the trainer's sections, composed with tasks', rollout's and swarm's)
- `loop.Trainer`: one step = rollout -> rewards -> advantages -> update -> weight sync
- `group_scorer`: a group's rewards; `external.LocalJudge`: a peer's group built and judged here
- `policy`, `precision`, `optim`: the model with float32 masters, autocast, AdamW
- `batch`, `update`: rows packed into micro-batches, the update with its losses
- `evaluate`, `checkpoint`, `tracking`: held-out accuracy, atomic checkpoints, W&B and metrics
- `runtime/`: start, stop, kill and resume safely; `builtin/`: the shipped models
"""
