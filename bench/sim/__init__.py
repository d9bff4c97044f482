"""Engine scaling, measured (two Ray engines) and simulated (up to 1,024, virtual clock).

- `scaling`: one vs two engine actors on Ray, measured here; merges the projection in.
- `simulate_scale`: the real scheduler and pool over simulated engines.
- `sim_engine`: the simulated engine and the virtual-time event loop.
- `sim_calibrate`: engine costs from the measured results in bench/results/.
- `sim_report`: per-run totals, the sweep's summary, merging parts.
- `pipelined`: the product's pipelined loop (`RolloutAhead`) over simulated engines and trainer.
- `pipeline_sweep`: sync vs APRIL vs APRIL + pipeline, `cpu` and `gpu` calibrations, 1-1,024 engines.
- `gpu_profile`: the `gpu` calibration, each cost from a cited published figure.
"""
