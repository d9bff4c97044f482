"""Pipelined steps: seconds per training step and where the time went, per pipeline setting.

Runs `rl-train` itself (real engine, real updates, a weight load after every step) for each
setting below, repetitions interleaved so machine noise falls on every setting alike, and reads
each run's metrics.jsonl: median seconds per step after the warm-up steps, the engine's and the
trainer's busy fractions, the trainer's wait for a batch and the interrupts per step. Evaluation
is off the clock (and all but off: one at the start and one at the end).

    python -m bench.april.pipeline_steps                             # toy workload, ~12 min here
    python -m bench.april.pipeline_steps --recipe recipes/grpo_small_math.yaml --steps 20 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, save_json

SETTINGS = {
    "april": [],
    "pipeline_abort_k1": ["rollout.max_async=1", "rollout.interrupt=abort"],
    "pipeline_keep_k1": ["rollout.max_async=1", "rollout.interrupt=keep"],
    "pipeline_abort_k2": ["rollout.max_async=2", "rollout.interrupt=abort"],
}


PIPELINE_KEYS = ("pipeline/engine_busy", "pipeline/trainer_busy", "pipeline/trainer_wait_s",
                 "pipeline/interrupts", "pipeline/max_token_age")


def one_run(recipe: Path, steps: int, overrides: list[str], extra: list[str], work: Path,
            keys: tuple[str, ...] = PIPELINE_KEYS, env: dict[str, str] | None = None) -> dict:
    """Train `steps` steps; per-step seconds and the per-step series of `keys` from metrics.jsonl."""
    out = work / f"run-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "rollover.trainer.cli", str(recipe), f"train.output_dir={out}",
               f"train.steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}",
               "task.eval_size=16", "tracking.wandb=disabled", *extra, *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_seconds": round(wall, 3), "step_seconds": [m["time/step"] for m in rows if "time/step" in m],
            "pipeline": {k: [m[k] for m in rows if k in m] for k in keys}}


def summarize(runs: list[dict], warmup: int) -> dict:
    """Median s/step over every run's steps after `warmup`, and per-run medians for the spread."""
    per_run = [statistics.median(r["step_seconds"][warmup:]) for r in runs]
    figures = {"seconds_per_step": statistics.median(per_run),
               "seconds_per_step_runs": [round(x, 4) for x in per_run]}
    for key in runs[0]["pipeline"]:
        values = [v for r in runs for v in r["pipeline"][key][warmup:]]
        figures[key] = statistics.mean(values) if values else None
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes/grpo_math.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--set", action="append", default=[], help="a recipe override for every run")
    p.add_argument("--out", type=Path, default=RESULTS / "pipeline_steps.json")
    args = p.parse_args(argv)
    names = args.settings.split(",")
    started, info = time.time(), machine()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="pipeline-") as tmp:
        for rep in range(args.reps):
            for name in names:
                runs[name].append(one_run(args.recipe, args.steps, SETTINGS[name], args.set, Path(tmp)))
                print(f"rep {rep} {name}: {statistics.median(runs[name][-1]['step_seconds'][args.warmup:]):.3f} s/step",
                      flush=True)
    result = {"benchmark": "pipelined steps: s/step and busy fractions per setting",
              "config": {**vars(args), "recipe": str(args.recipe), "out": str(args.out),
                         "settings": {n: SETTINGS[n] for n in names}},
              "settings": {n: summarize(runs[n], args.warmup) for n in names},
              "runs": runs, "machine": info, "bench_wall_seconds": round(time.time() - started, 1)}
    base = result["settings"].get("april", {}).get("seconds_per_step")
    for figures in result["settings"].values():
        figures["speedup_over_april"] = round(base / figures["seconds_per_step"], 3) if base else None
    save_json(result, args.out)
    for name, f in result["settings"].items():
        print(f"{name:20s} {f['seconds_per_step']:.3f} s/step {f['seconds_per_step_runs']}  x{f['speedup_over_april']}  "
              f"engine {f['pipeline/engine_busy']:.0%} trainer {f['pipeline/trainer_busy']:.0%} "
              f"interrupts {f['pipeline/interrupts']:.2f}")


if __name__ == "__main__":
    main()
