"""rollover.rollout: generation for RL steps.

- `engine.RolloutEngine`: vLLM AsyncLLM wrapper (stream token ids + log-probs, abort, atomic
  weight loads, sleep/wake for a colocated trainer); `settings.EngineSettings` builds it
- `april.AprilScheduler`: N scored groups per step with over-provisioning and partial rollouts;
  failures are retried or dropped with a counted reason, never lost
- `buffer.PartialBuffer`, `ledger.Ledger`: recycled groups and the conservation ledger
- `scoring.ScoringPool`, `scoring.KeptScores`: judges off the event loop, one call per group
- `types.Sample`, `types.Group`: the data contract with algos/ and trainer/
"""
