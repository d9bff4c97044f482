"""rollover's benchmarks: each answers one question and writes its JSON to bench/results/.

Not part of the installed `rollover` package: run them from the repository root as modules,
`python -m bench.<family>.<name>` (the root is then on the import path). `bench/README.md`
lists every benchmark with its question, command, minutes here and result file.

- `common`: what they share: the machine record, JSON saving, median/min/max spreads.
- `april/`: APRIL rollouts: throughput vs synchronous, adaptive over-provisioning, pipelined steps.
- `e2e/`: end to end against TRL's GRPOTrainer, the TRL baseline, the plot.
- `sim/`: engine scaling: two Ray engines measured, up to 256 simulated on a virtual clock.
- `swarm/`: SAPO sharing on one machine, the sybil-flood cost.
- `chaos/`: random kills of `rl-train`, resumed exactly.
- `gpu/`: the GPU check without vLLM, log-prob memory.
"""
