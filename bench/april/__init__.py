"""APRIL rollouts on the real engine.

- `april_steps`: the measured step of each mode (rollout, then a weight load as in training).
- `april_throughput`: APRIL vs synchronous useful tokens/s on a long-tailed workload; its
  workload options, scheduler and engine harness are shared by `over_provision` and `sim/`.
- `over_provision`: adaptive over-provisioning against fixed ratios.
- `pipeline_steps`: `rl-train` seconds per step per pipeline setting.
"""
