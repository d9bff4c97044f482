"""Where a small step's time goes, with and without the CPU engine's fixes.

Runs `rl-train` itself on the toy workload of `bench/e2e/e2e_vs_trl.py` (8 prompts x 8
completions, 48-token budget), a weight load after every step, and reads each run's
metrics.jsonl: per step the rollout (in the pipelined mode: the trainer's wait for it), the
update, the weight load and its check, what is left (scheduling, scoring, logging), and the
tokens generated and trained. Settings:

- `sync_*`: synchronous (no over-provisioning, no partial rollouts: rollout, update, weight load).
  `vllm_spin_1_thread` is the state before the fixes: vLLM's own shared-memory wait (its
  processes spin 1 s after each message; `VLLM_PLUGINS=none` keeps rollover's plugin out) and
  one update thread; `no_spin_1_thread` adds rollover's vLLM plugin (rollout/vllm_plugin.py);
  `no_spin` also gives the update every core (the default: the engine sleeps meanwhile).
- `april`, `april_default_gc`: the recipe as written (APRIL), and with Python's garbage collector
  left at its defaults (`ROLLOVER_GC_TUNING=0`, trainer/runtime/heap.py: no frozen start-up
  heap, generation 0 collected every 700 allocations). Full collections hit a few steps hard, so
  compare the `mean` step, not only the median.
- `pipelined_*`: the recipe's APRIL with `rollout.max_async=1` (one update thread either way),
  with vLLM's spin and with the plugin.
- `*_worker_process`: the model in a vLLM worker process of its own (`ROLLOVER_CPU_EXECUTOR=mp`,
  vLLM's CPU default) instead of in the engine core (rollout/cpu_executor.py). Compare the step
  and `outside_steps_s`, a run's wall time outside its steps (start-up, last evaluation, shutdown).

Repetitions are interleaved so machine noise falls on every setting alike.

    python -m bench.april.step_costs                  # ~10 min here
    python -m bench.april.step_costs --workload chat --steps 20 --out bench/results/step_costs_chat.json \
        --settings sync_vllm_spin_1_thread,sync_no_spin_1_thread,sync_no_spin
    python -m bench.april.step_costs --reps 1 --steps 8 --out /tmp/step_costs.json
    python -m bench.april.step_costs --workload demo --settings april,april_default_gc --reps 3 \
        --out bench/results/step_costs_gc.json
    python -m bench.april.step_costs --settings sync_no_spin,sync_worker_process,april,april_worker_process \
        --reps 3 --out bench/results/step_costs_executor.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.april.pipeline_steps import one_run
from bench.common import RESULTS, ROOT, machine, save_json

WORKLOADS = {"toy": "recipes/grpo_math.yaml", "demo": "recipes/grpo_math.yaml", "chat": "recipes/grpo_chat.yaml"}
TOY = ["rollout.groups_per_step=8", "rollout.group_size=8", "rollout.max_tokens=48"]
SYNC = ["rollout.over_provision=1", "rollout.partial=false"]
PIPELINED = ["rollout.max_async=1"]  # the recipe's APRIL, rollout of step k+1 beside update k
NO_PLUGIN = {"VLLM_PLUGINS": "none"}  # vLLM loads no general plugin: its own 1 s spin
WORKER_PROCESS = {"ROLLOVER_CPU_EXECUTOR": "mp"}  # the model in a vLLM worker process of its own
SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "sync_vllm_spin_1_thread": (NO_PLUGIN, [*SYNC, "train.cpu_threads=1"]),
    "sync_no_spin_1_thread": ({}, [*SYNC, "train.cpu_threads=1"]),
    "sync_no_spin": ({}, SYNC),
    "pipelined_vllm_spin": (NO_PLUGIN, PIPELINED),
    "pipelined_no_spin": ({}, PIPELINED),
    "april": ({}, []),
    "april_default_gc": ({"ROLLOVER_GC_TUNING": "0"}, []),
    "sync_worker_process": (WORKER_PROCESS, SYNC),
    "april_worker_process": (WORKER_PROCESS, []),
}
BASELINES = {"sync": "sync_vllm_spin_1_thread", "pipelined": "pipelined_vllm_spin"}
# Phases that add up to the step; the rest is `other`. The weight check runs inside the load.
PHASES = {"rollout": "time/rollout", "update": "time/train", "weight_load": "time/weight_sync"}
PARTS = {"weight_check": "time/weight_check", "gc": "time/gc"}
TOKENS = {"generated_tokens": "rollout/generated_tokens", "trained_tokens": "rollout/useful_tokens"}


def summarize(runs: list[dict], warmup: int) -> dict:
    """Per figure: the median over runs of each run's median after `warmup` steps, and the runs';
    `mean`: the same of each run's mean (a stall of a few steps shows there, not in the median)."""
    def figure(series: list[list[float]]) -> dict:
        per_run = [statistics.median(s[warmup:]) for s in series]
        means = [statistics.fmean(s[warmup:]) for s in series]
        return {"median": round(statistics.median(per_run), 4), "runs": [round(x, 4) for x in per_run],
                "mean": round(statistics.median(means), 4), "run_means": [round(x, 4) for x in means]}

    figures = {"step": figure([r["step_seconds"] for r in runs])}
    for name, key in {**PHASES, **PARTS, **TOKENS}.items():
        figures[name] = figure([r["pipeline"][key] for r in runs])
    other = [[step - sum(r["pipeline"][key][i] for key in PHASES.values())
              for i, step in enumerate(r["step_seconds"])] for r in runs]
    figures["other"] = figure(other)
    # A run's cost outside its steps: interpreter and engine start, the last evaluation and
    # checkpoint, the shutdown.
    outside = [r["wall_seconds"] - sum(r["step_seconds"]) for r in runs]
    figures["outside_steps_s"] = {"median": round(statistics.median(outside), 2), "runs": [round(x, 2) for x in outside]}
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=WORKLOADS, default="toy",
                   help="toy: grpo_math.yaml at the e2e toy shape; demo, chat: grpo_math.yaml, grpo_chat.yaml as written")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of SETTINGS")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "step_costs.json")
    args = p.parse_args(argv)
    recipe = ROOT / WORKLOADS[args.workload]
    started, info = time.time(), machine()
    keys = (*PHASES.values(), *PARTS.values(), *TOKENS.values())
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting {', '.join(unknown)} (known: {', '.join(SETTINGS)})")
    shape = TOY if args.workload == "toy" else []
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="step-costs-") as tmp:
        for rep in range(args.reps):
            for name in names:
                env, overrides = SETTINGS[name]
                run = one_run(recipe, args.steps, overrides, shape, Path(tmp), keys, env)
                runs[name].append(run)
                print(f"rep {rep} {name}: {statistics.median(run['step_seconds'][args.warmup:]):.3f} s/step",
                      flush=True)
    settings = {name: summarize(runs[name], args.warmup) for name in names}
    for name, figures in settings.items():
        before = settings.get(BASELINES.get(name.split("_")[0], ""))
        figures["speedup_over_vllm_spin"] = \
            round(before["step"]["median"] / figures["step"]["median"], 3) if before else None
    result = {"benchmark": "a synchronous toy step's phases, before and after the CPU engine's fixes",
              "config": {"workload": args.workload, "recipe": str(recipe.relative_to(ROOT)), "steps": args.steps,
                         "warmup": args.warmup, "reps": args.reps, "shared_overrides": shape,
                         "settings": {n: {"env": SETTINGS[n][0], "overrides": SETTINGS[n][1]} for n in names}},
              "settings": settings, "runs": runs, "machine": info, "bench_wall_seconds": round(time.time() - started, 1)}
    save_json(result, args.out)
    for name, f in settings.items():
        print(f"{name:20s} step {f['step']['median']:.3f}  " +
              "  ".join(f"{k} {f[k]['median']:.3f}" for k in (*PHASES, *PARTS, "other")) +
              f"  outside steps {f['outside_steps_s']['median']:.1f} s  x{f['speedup_over_vllm_spin']}")


if __name__ == "__main__":
    main()
