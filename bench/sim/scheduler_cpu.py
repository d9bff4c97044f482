"""The scheduler's own CPU per step at 1 to 1,024 simulated engines, before and after issue 26.

Question: does one driver process keep up with 1,024 engines? The real `AprilScheduler` and
`EnginePool` drive simulated engines (`simulate_scale.simulate`: virtual clock, APRIL mode,
homogeneous engines, `--groups-per-engine` 4, over-provision 2, so 8 x engines groups in flight),
and each step's scheduler CPU is measured from outside with `rollout/cpu_clock.py` (thread CPU
while the step's own coroutine runs: launching, waiting, settling, aborting, filing; not the
group runs' token streaming, not the engines). The same clock wraps both schedulers:

- `new`: the scheduler in this tree (completion-driven collection, heap-ordered buffer); its own
  metric `rollout/scheduler_cpu_s` is recorded beside the outside measure;
- `old`: `rollout/april.py` and `rollout/buffer.py` as of `--old-ref` (before the change: an
  `asyncio.wait` over every in-flight task at each wake-up, an O(buffer) pop), loaded from git
  into private modules; everything else is this tree's.

Target (issue 26): <= 0.5 s per step at 1,024 engines, growing linearly with groups in flight.
Engine costs are the stored calibration (`scaling_sim.json`'s `calibration.used`), which only
sets virtual time; the CPU figures are real. Steps: `--warmup` then `--steps` measured, per
scheduler and engine count, run in turn at each count (same machine load for both).

    python -m bench.sim.scheduler_cpu                        # ~6 min here
    python -m bench.sim.scheduler_cpu --quantum 0 --steps 2 --section scheduler_cpu_quantum0  # ~12
    python -m bench.sim.scheduler_cpu --engines 1,64 --steps 2 --out /tmp/cpu.json

Writes a summary (no per-step records) under `scheduler_cpu` (or `--section`) in
bench/results/scaling_sim.json, keeping the rest of that file (or a file of its own with --out).
The simulator's options pass through: `--quantum 0` delivers every token the moment it is
computed, so groups end one by one (a wake-up each), as on real engines, rather than in batches
on the default 5 ms grid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine, save_json
from bench.sim import simulate_scale
from bench.sim.sim_calibrate import calibrate, costs_of
from bench.sim.sim_engine import SimCosts, run_virtual, run_as_driver

OLD_REF = "f124dc3af0f74a99b78a11db5c1bbec627d26e67"  # the last commit with the old collection
TARGET_S_AT_1024 = 0.5


def load_old_scheduler(ref: str) -> type:
    """`AprilScheduler` as of `ref`, with that commit's `PartialBuffer`, as private modules."""
    def module(name: str, path: str) -> types.ModuleType:
        source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        mod = types.ModuleType(name)
        mod.__file__ = f"{ref[:8]}:{path}"
        sys.modules[name] = mod  # dataclasses look their module up
        exec(compile(source, mod.__file__, "exec"), mod.__dict__)
        return mod

    buffer = module("_old_rollout_buffer", "rollout/buffer.py")
    april = module("_old_rollout_april", "rollout/april.py")
    april.PartialBuffer = buffer.PartialBuffer  # the old scheduler with the old buffer
    return april.AprilScheduler


def stored_costs(args: argparse.Namespace) -> tuple[SimCosts, float, str]:
    """Engine costs and train seconds: the stored sweep's, else calibrated without the prefill fit."""
    stored = args.results / "scaling_sim.json"
    if stored.exists():
        used = json.loads(stored.read_text())["calibration"]["used"]
        return (SimCosts(base_s=used["base_s"], per_seq_s=used["per_seq_s"], sync_s=used["sync_s"],
                         prefill_per_token_s=used["prefill_per_token_s"], prefill_free_tokens=16),
                used["train_s"], f"{stored.name} calibration.used")
    cal = calibrate(args.results)
    return costs_of(cal, args, 0.0), cal["train_s"], "sim_calibrate.calibrate (no prefill fit)"


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    steps = [s for s in run["steps"] if not s["warmup"]]
    cpu = [s["scheduler_task_cpu_s"] for s in steps]
    metric = [s["scheduler_cpu_s"] for s in steps if s["scheduler_cpu_s"] is not None]
    return {
        "engines": run["engines"], "groups_per_step": run["groups_per_step"],
        "in_flight_groups": run["in_flight_groups"], "measured_steps": len(steps),
        "scheduler_cpu_s_per_step": {"median": statistics.median(cpu), "min": min(cpu), "max": max(cpu)},
        "scheduler_cpu_us_per_in_flight_group": 1e6 * statistics.median(cpu) / run["in_flight_groups"],
        "metric_rollout_scheduler_cpu_s": statistics.median(metric) if metric else None,
        "gc_in_scheduler_s_per_step": statistics.median(s["scheduler_task_gc_s"] for s in steps),
        "loop_cpu_s_per_step": statistics.median(s["loop_cpu_s"] for s in steps),
        "rollout_real_s_per_step": statistics.median(s["rollout_real_s"] for s in steps),
        "groups_resumed_per_step": statistics.median(s["groups_resumed"] for s in steps),
        "buffer_size_end": steps[-1]["buffer_size"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="1,64,256,1024")
    p.add_argument("--groups-per-engine", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per run (fills the buffer)")
    p.add_argument("--schedulers", default="new,old", help="new and/or old, comma-separated")
    p.add_argument("--old-ref", default=OLD_REF, help="git commit of the old scheduler")
    p.add_argument("--out", type=Path, default=simulate_scale.DEFAULT_OUT,
                   help="JSON to write the section into (other keys are kept)")
    p.add_argument("--section", default="scheduler_cpu",
                   help="the key of this run's summary in --out (a variant gets its own)")
    args, rest = p.parse_known_args(argv)
    base = simulate_scale.parse_args(rest)  # the workload and engine options, their defaults
    for key in ("groups_per_engine", "steps", "warmup", "out"):
        setattr(base, key, getattr(args, key))
    base.engines = [int(x) for x in args.engines.split(",") if x.strip()]
    base.schedulers = [x.strip() for x in args.schedulers.split(",") if x.strip()]
    base.old_ref, base.section = args.old_ref, args.section
    if set(base.schedulers) - {"new", "old"} or not base.schedulers:
        p.error("--schedulers takes new and/or old")
    return base


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    costs, train_s, source = stored_costs(args)
    classes = {"new": simulate_scale.AprilScheduler}
    if "old" in args.schedulers:
        try:
            classes["old"] = load_old_scheduler(args.old_ref)
        except subprocess.CalledProcessError:
            raise SystemExit(f"scheduler_cpu: commit {args.old_ref} is not in this clone "
                             "(fetch the full history, or run --schedulers new)") from None
    info, started = machine(), time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in args.schedulers}
    for engines in args.engines:
        for name in args.schedulers:
            run = run_virtual(simulate_scale.simulate(args, costs, engines=engines, mode="april",
                                                      hetero=False, train_s=train_s,
                                                      scheduler_cls=classes[name]))
            row = summarize(run)
            rows[name].append(row)
            print(f"{name} {engines:5d} engines, {row['in_flight_groups']:5d} groups in flight: "
                  f"scheduler {row['scheduler_cpu_s_per_step']['median']:.3f} s CPU/step "
                  f"({row['scheduler_cpu_us_per_in_flight_group']:.0f} us/group; gc "
                  f"{row['gc_in_scheduler_s_per_step']:.3f} s apart), loop "
                  f"{row['loop_cpu_s_per_step']:.2f} s, {row['rollout_real_s_per_step']:.1f} s real",
                  flush=True)
    info["load_avg_end"] = list(os.getloadavg())
    section = {
        "question": "the scheduler's own CPU per step (rollout/cpu_clock.py, thread CPU while the "
                    "step's coroutine runs) at 1-1,024 simulated engines, 4 groups each, APRIL",
        "target": f"<= {TARGET_S_AT_1024} s per step at 1,024 engines, linear in groups in flight",
        "old_ref": args.old_ref,
        "costs_from": source,
        "config": {"groups_per_engine": args.groups_per_engine, "group_size": args.group_size,
                   "over_provision": args.over_provision, "max_staleness": args.max_staleness,
                   "warmup": args.warmup, "steps": args.steps, "quantum": args.quantum,
                   "chunk": args.chunk, "max_len": args.max_len},
        "by_scheduler": rows,
        "machine": info,
        "note": "2-core VM shared with other work while this ran: CPU seconds are this thread's "
                "own (thread_time), wall figures are not comparable",
        "wall_s": time.perf_counter() - started,
    }
    if "new" in rows and "old" in rows:
        section["old_over_new"] = {str(o["engines"]): o["scheduler_cpu_s_per_step"]["median"]
                                   / max(n["scheduler_cpu_s_per_step"]["median"], 1e-9)
                                   for o, n in zip(rows["old"], rows["new"])}
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result[args.section] = section
    save_json(result, args.out)
    print(f"{section['wall_s']:.0f} s real -> {args.out}", flush=True)
    return result


if __name__ == "__main__":
    run_as_driver(main)
