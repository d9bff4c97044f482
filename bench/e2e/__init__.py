"""End to end: rl-train against TRL's GRPOTrainer, time to a held-out accuracy target.

- `e2e_vs_trl`: the benchmark (runs every system, seed and workload in its own process).
- `trl_baseline`: one TRL run on a recipe's task (launched by `e2e_vs_trl`).
- `e2e_lib`: its pure arithmetic (targets, times to target, summaries); unit-tested.
- `plot`: accuracy against training seconds, from the JSON.
"""
