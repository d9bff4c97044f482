"""rollover.trainer.runtime: what makes a run safe to start, stop, kill and resume, apart from training.

- `console`: rl-train's console and log file (third-party output captured, levels named plainly)
- `stopping`: SIGINT/SIGTERM as a graceful stop at the next safe point, with the resume command
- `watchdog`: a small process that stops rl-train's leftover engine processes however it died
- `failpoints`: `ROLLOVER_FAILPOINT=<point>:<step>` kills a run inside a named phase (tests, chaos)
- `run_folder`: one run per folder (a record lock), and a folder a run never started in is removed
- `resume_check`: a resume refuses recipe changes that would change what the saved state means
- `uid_log`: the prompt uids each step trained on, rewound on resume
- `cpu_split`: on a CPU-only host, the engine's cores and the trainer's
"""
