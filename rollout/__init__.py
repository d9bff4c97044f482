"""rollover.rollout: generation for RL steps.

- `engine.RolloutEngine`: vLLM AsyncLLM wrapper (stream token ids + log-probs, abort, load weights)
- `april.AprilScheduler`: N scored groups per step with over-provisioning and partial rollouts
- `buffer.PartialBuffer`, `ledger.Ledger`: recycled groups and the conservation ledger
- `types.Sample`, `types.Group`: the data contract with algos/ and trainer/
"""
