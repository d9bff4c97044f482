"""rollover.rollout: generation for RL steps.

- `engine.RolloutEngine`: vLLM AsyncLLM wrapper (stream token ids + log-probs, abort, atomic
  weight loads, sleep/wake for a colocated trainer); `settings.EngineSettings` builds it; its
  parts: `admission.AdmissionGate` (admitted, waiting and aborted requests, the stamped version)
  and `engine_control.EngineControl` (weight loads, probe, sleep)
- `engine_api.Engine`: the interface every engine has (`RolloutEngine`, `remote.RemoteEngine`
  in a Ray actor, `pool.EnginePool` over many, the simulator's); a pool's `router()` routes
- `weights/`: the weight transports behind one `WeightTransport` protocol, and the check after
  every load
- `april.AprilScheduler`: N scored groups per step with over-provisioning and partial rollouts;
  failures are retried or dropped with a counted reason, never lost; its parts:
  `planning` (what starts next), `filing` (where each group goes), `step_state` (a running
  step and its completion queue), `cpu_clock` (its own CPU per step)
- `buffer.PartialBuffer`, `ledger.Ledger`: recycled groups and the conservation ledger
- `scoring.ScoringPool`, `scoring.KeptScores`: judges off the event loop, one call per group
- `types.Sample`, `types.Group`: the data contract with algos/ and trainer/
"""
