"""The driver's garbage collector at scale: Python's defaults against rl-train's settings.

Runs the scaling simulator's APRIL loop (the real scheduler, buffer, ledger and group runs over
simulated engines, `bench/sim/pipelined.py`) at a few hundred engines, once with Python's
collector as it comes and once set as rl-train sets it for its driver
(`trainer/runtime/heap.py` `tune_collector`: start-up heap frozen, generation 0 every 50,000
allocations). Each run is its own process (the collector's settings are process-wide); the
settings alternate over the repetitions. Reported per run: collector seconds and collections
per generation (gc.callbacks), the run's wall and thread CPU seconds, and the scheduler's own
CPU per step (which leaves the collector out by construction, rollout/cpu_clock.py).

    python -m bench.sim.collector                      # ~12 min here
    python -m bench.sim.collector --engines 64 --reps 1 --out /tmp/collector.json
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, save_json

SETTINGS = {"python_defaults": {"ROLLOVER_GC_TUNING": "0"}, "rl_train": {}}


def one_run(engines: int, steps: int) -> dict:
    """In this process: set the collector as the environment says, run the simulation, report."""
    from bench.sim.pipeline_sweep import cpu_profile
    from bench.sim.pipelined import simulate_pipeline
    from bench.sim.sim_engine import run_virtual
    from rollover.trainer.runtime.heap import tune_collector

    profile, _ = cpu_profile(RESULTS)
    frozen = tune_collector("bench.sim.collector")
    seconds: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            seconds[info["generation"]] += time.perf_counter() - started.pop()
            counts[info["generation"]] += 1

    gc.callbacks.append(on_gc)
    wall, cpu = time.perf_counter(), time.thread_time()
    run = run_virtual(simulate_pipeline(profile, engines=engines, mode="april", warmup=1, steps=steps))
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    gc.callbacks.remove(on_gc)
    return {"engines": engines, "groups_in_flight": 8 * engines, "frozen_objects": frozen,
            "thresholds": list(gc.get_threshold()),
            "collector_s": {str(g): round(seconds[g], 3) for g in range(3)},
            "collections": {str(g): counts[g] for g in range(3)},
            "collector_s_total": round(sum(seconds.values()), 3), "wall_s": round(wall, 2),
            "thread_cpu_s": round(cpu, 2), "scheduler_cpu_s_per_step": round(run["scheduler_cpu_s_per_step"], 4)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="256,1024", help="comma-separated engine counts")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "collector_sim.json")
    p.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)  # the child's side
    args = p.parse_args(argv)
    engine_counts = [int(e) for e in str(args.engines).split(",")]
    if args.one_run:
        print(json.dumps(one_run(engine_counts[0], args.steps)))
        return {}
    info = machine()
    runs: dict[str, dict[str, list[dict]]] = {str(e): {name: [] for name in SETTINGS} for e in engine_counts}
    for engines in engine_counts:
        for rep in range(args.reps):
            for name, env in SETTINGS.items():
                child = subprocess.run([sys.executable, "-m", "bench.sim.collector", "--one-run",
                                        "--engines", str(engines), "--steps", str(args.steps)],
                                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
                if child.returncode != 0:
                    sys.exit(f"bench.sim.collector: the {name} run failed: {child.stderr.strip()[-500:]}")
                run = json.loads(child.stdout.strip().splitlines()[-1])
                runs[str(engines)][name].append(run)
                print(f"{engines} engines rep {rep} {name:16s} collector {run['collector_s_total']:6.2f} s "
                      f"(full collections {run['collections']['2']})  wall {run['wall_s']:6.1f} s  "
                      f"scheduler {run['scheduler_cpu_s_per_step']:.3f} s CPU/step", flush=True)
    figures = ("collector_s_total", "wall_s", "thread_cpu_s", "scheduler_cpu_s_per_step")
    summary = {engines: {name: {key: statistics.median(r[key] for r in rs) for key in figures}
                         for name, rs in by_setting.items()} for engines, by_setting in runs.items()}
    result = {"benchmark": "the driver's garbage collector in the scaling simulator: Python's defaults "
                           "against rl-train's settings (trainer/runtime/heap.py)",
              "config": {"engines": engine_counts, "groups_per_engine": 4, "group_size": 8, "mode": "april",
                         "steps": [1, args.steps], "reps": args.reps, "settings": SETTINGS},
              "summary": summary, "runs": runs, "machine": info}
    save_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
