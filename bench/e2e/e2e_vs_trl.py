"""End to end: TRL's GRPOTrainer vs rl-train (synchronous, APRIL, APRIL pipelined), per workload.

Each workload is a recipe: `toy` (recipes/grpo_math.yaml, builtin:tiny-math, short answers),
`long` (recipes/grpo_small_math.yaml, builtin:small-math, long long-tailed answers) and `chat`
(recipes/grpo_chat.yaml, builtin:chat-math: word problems through a chat template, math-verify). Every system
trains the same model on the same task with the same batch shape (N prompts x G completions),
token budget, learning rate and step budget: the recipe plus one shared list of overrides, which
`bench/e2e/trl_baseline.py --recipe` reads too. Per system only the keys in SYSTEMS differ.

Each (workload, seed, system) runs in its own process, one after another (never in parallel:
they would share the cores), seeds interleaved so machine noise falls on every system alike.
Clocks count training only (rollout + update + weight sync) from the first step, excluding
evaluation and start-up: rl-train's summary.json `eval_curve[].train_seconds`, TRL's
`curve[].wall_seconds`.

The target accuracy comes from the runs themselves, per workload:
`initial + fraction * (best_final - initial)`, `initial` the median step-0 held-out accuracy,
`best_final` the best system's median final accuracy. Time to target is the training seconds at
the first evaluation at or above it; per system the median over seeds (a seed that never
reached counts as +inf) with (min, max). `speedup_to_target` = TRL's median / the best rl-train
system's. The JSON is saved after every run; `--resume` keeps the successful runs it holds.

    python -m bench.e2e.e2e_vs_trl                               # ~1 hour on 2 cores
    python -m bench.e2e.e2e_vs_trl --workloads chat --resume     # ~2.5 hours more: the chat row
    python -m bench.e2e.e2e_vs_trl --workloads toy --seeds 0 --steps-toy 3 \\
        --set toy.train.eval_every=3 --set toy.task.eval_size=16 --out /tmp/e2e_smoke.json
    python -m bench.e2e.plot --in bench/results/e2e_vs_trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine, save_json
from bench.e2e.e2e_lib import drop_totals, mean_prefixed, summarize_workload

# Per-system recipe overrides for rl-train; None is the TRL baseline (bench/e2e/trl_baseline.py).
SYSTEMS: dict[str, list[str] | None] = {
    "trl": None,
    "sync": ["rollout.over_provision=1", "rollout.partial=false"],
    "april": [],  # the recipe as written
    "april_pipeline": ["rollout.max_async=1"],  # rollout of step k+1 overlaps the update of step k
}
BASELINE = "trl"

# Per workload: the recipe and the overrides every system shares (on top of the recipe).
WORKLOADS: dict[str, dict[str, Any]] = {
    "toy": {"recipe": "recipes/grpo_math.yaml",
            "settings": {"train.steps": 60, "train.eval_every": 10, "task.eval_size": 128,
                         "rollout.groups_per_step": 8, "rollout.group_size": 8, "rollout.max_tokens": 48}},
    # The recipe's steps (at most max_steps: one run a few minutes here) and eval settings
    # (eval_every lowered to leave MIN_EVALS points; see workload_overrides).
    "long": {"recipe": "recipes/grpo_small_math.yaml", "settings": {}, "max_steps": 30},
    # builtin:chat-math on the shipped word problems: BPE tokenizer, ChatML template, system
    # prompt, math-verify. The recipe's 200 steps take ~15 min per run here; 100 show the climb.
    "chat": {"recipe": "recipes/grpo_chat.yaml", "settings": {}, "max_steps": 100},
}
MIN_EVALS = 5  # evaluations after step 0 a derived eval_every leaves, for time-to-target resolution
TAIL_CHARS = 3000  # of a failed run's stderr, kept in the JSON


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="toy,long", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, of the SYSTEMS table")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--target-fraction", type=float, default=0.8,
                   help="target = initial + fraction x (best final - initial)")
    p.add_argument("--steps-toy", type=int, default=None, help="steps of `toy` (default 60)")
    p.add_argument("--steps-long", type=int, default=None,
                   help=f"steps of `long` (default: the recipe's, at most {WORKLOADS['long']['max_steps']})")
    p.add_argument("--steps-chat", type=int, default=None,
                   help=f"steps of `chat` (default: the recipe's, at most {WORKLOADS['chat']['max_steps']})")
    p.add_argument("--set", action="append", default=[], metavar="WORKLOAD.KEY=VALUE",
                   help="a recipe override for one workload, e.g. toy.task.eval_size=16 (repeatable)")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds before a run is killed")
    p.add_argument("--resume", action="store_true", help="keep the successful runs already in --out")
    p.add_argument("--out", type=Path, default=RESULTS / "e2e_vs_trl.json")
    args = p.parse_args(argv)
    args.workloads, args.systems = args.workloads.split(","), args.systems.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for names, known, what in ((args.workloads, WORKLOADS, "workload"), (args.systems, SYSTEMS, "system")):
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"unknown {what} {', '.join(unknown)} (known: {', '.join(known)})")
    bad = [item for item in args.set if item.partition(".")[0] not in WORKLOADS or "=" not in item]
    if bad:
        p.error(f"--set {bad[0]}: expected WORKLOAD.section.key=value, WORKLOAD one of {', '.join(WORKLOADS)}")
    if not 0 < args.target_fraction <= 1:
        p.error("--target-fraction must be in (0, 1]")
    return args


# ---- workloads ---------------------------------------------------------------------------------


def workload_overrides(name: str, args: argparse.Namespace) -> list[str]:
    """The overrides every system of workload `name` shares: table, step option, --set, derived eval_every."""
    from rollover.trainer.config import load_recipe

    settings = {key: str(value) for key, value in WORKLOADS[name]["settings"].items()}
    recipe = load_recipe(ROOT / WORKLOADS[name]["recipe"])
    steps = getattr(args, f"steps_{name}", None)
    if steps is None and "max_steps" in WORKLOADS[name]:
        steps = min(recipe.train.steps, WORKLOADS[name]["max_steps"])
    if steps is not None:
        settings["train.steps"] = str(steps)
    for item in args.set:
        workload, _, assignment = item.partition(".")
        if workload == name:
            key, _, value = assignment.partition("=")
            settings[key] = value
    if "train.eval_every" not in settings:  # the recipe's, unless it leaves too few points
        steps = int(settings.get("train.steps", recipe.train.steps))
        settings["train.eval_every"] = str(max(1, min(recipe.train.eval_every, steps // MIN_EVALS)))
    settings["train.save_every"] = settings.get("train.steps", str(recipe.train.steps))  # one save, at the end
    return [f"{key}={value}" for key, value in settings.items()]


def resolved_settings(name: str, overrides: list[str]) -> dict[str, Any]:
    """What the shared recipe + overrides amount to: the settings every system trains with."""
    from rollover.trainer.config import load_recipe

    r = load_recipe(ROOT / WORKLOADS[name]["recipe"], overrides)
    return {"model": r.model.path, "max_model_len": r.model.max_model_len, "task": r.task.model_dump(mode="json"),
            "steps": r.train.steps, "eval_every": r.train.eval_every, "eval_size": r.task.eval_size,
            "groups_per_step": r.rollout.groups_per_step, "group_size": r.rollout.group_size,
            "max_tokens": r.rollout.max_tokens, "temperature": r.rollout.temperature, "lr": r.train.lr,
            "loss": r.algo.loss, "over_provision": r.rollout.over_provision, "partial": r.rollout.partial,
            "max_staleness": r.rollout.max_staleness, "dynamic_sampling": r.algo.dynamic_sampling}


# ---- runs --------------------------------------------------------------------------------------


def run_command(command: list[str], work: Path, timeout: float) -> tuple[int, str, float]:
    """Run one benchmark process to completion; (exit status, stderr tail, wall seconds)."""
    started = time.perf_counter()
    with open(work / "stdout.log", "w") as out, open(work / "stderr.log", "w") as err:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=err, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    tail = ((work / "stderr.log").read_text(errors="replace") or
            (work / "stdout.log").read_text(errors="replace"))[-TAIL_CHARS:]
    if code == 124:
        tail += f"\n[killed after --run-timeout {timeout:.0f} s]"
    return code, tail, round(time.perf_counter() - started, 1)


def run_command_for(system: str, recipe: Path, shared: list[str], seed: int, work: Path) -> list[str]:
    """The command line of one run: trl_baseline.py or rl-train with the system's overrides."""
    if SYSTEMS[system] is None:
        return [sys.executable, "-m", "bench.e2e.trl_baseline", "--recipe", str(recipe),
                "--seed", str(seed), "--out", str(work / "trl.json"), *shared]
    return [sys.executable, "-m", "rollover.trainer.cli", str(recipe), *shared, *SYSTEMS[system],
            f"train.seed={seed}", f"rollout.seed={seed}", f"train.output_dir={work / 'run'}",
            "tracking.wandb=disabled"]


def read_trl(work: Path) -> dict[str, Any]:
    """A TRL run's figures from trl_baseline.py's JSON."""
    result = json.loads((work / "trl.json").read_text())
    seconds, tokens = result["train_wall_seconds"], result["completion_tokens"]
    return {"curve": [{"step": p["step"], "train_seconds": p["wall_seconds"], "accuracy": p["accuracy"]}
                      for p in result["curve"]],
            "steps": result["config"]["steps_done"], "train_seconds": seconds,
            "step_seconds": result["step_seconds"],
            "completion_tokens": tokens, "generated_tokens": tokens,  # TRL trains on all it generates
            "config": result["config"]}


def read_rl_train(work: Path) -> dict[str, Any]:
    """An rl-train run's figures from its run folder (summary.json and metrics.jsonl)."""
    folder = work / "run"
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    steps = [m for m in rows if "rollout/useful_tokens" in m]
    curve = [{"step": e["step"], "train_seconds": e["train_seconds"], "accuracy": e["accuracy"]}
             for e in summary["eval_curve"]]
    # The last evaluation's clock is unrounded (summary's wall_seconds is rounded to 0.1 s).
    last = curve[-1] if curve and curve[-1]["step"] == summary["steps"] else None
    return {"curve": curve, "steps": summary["steps"],
            "train_seconds": last["train_seconds"] if last else summary["wall_seconds"],
            "step_seconds": [round(m["time/step"], 4) for m in steps if "time/step" in m],
            "completion_tokens": sum(m["rollout/useful_tokens"] for m in steps),
            "generated_tokens": sum(m.get("rollout/generated_tokens", 0) for m in steps),
            "pipeline": mean_prefixed(steps, "pipeline/"), "rollout_drops": drop_totals(steps)}


def with_rates(figures: dict[str, Any]) -> dict[str, Any]:
    """Add seconds per step and tokens per training second to a run's figures."""
    seconds = max(figures["train_seconds"], 1e-9)
    return {**figures, "seconds_per_step": round(figures["train_seconds"] / max(figures["steps"], 1), 4),
            "completion_tokens_per_s": round(figures["completion_tokens"] / seconds, 2),
            "generated_tokens_per_s": round(figures["generated_tokens"] / seconds, 2)}


def run_one(system: str, recipe: Path, shared: list[str], seed: int, timeout: float) -> dict[str, Any]:
    """One run in its own process and temporary folder; a failure is recorded, never raised."""
    with tempfile.TemporaryDirectory(prefix=f"e2e-{system}-") as tmp:
        work = Path(tmp)
        command = run_command_for(system, recipe, shared, seed, work)
        load_before = os.getloadavg()[0]
        code, tail, wall = run_command(command, work, timeout)
        record = {"system": system, "seed": seed, "overrides": command_key(system, shared, seed),
                  "returncode": code, "process_seconds": wall,
                  "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        if code != 0:
            return {**record, "ok": False, "error": tail}
        try:
            figures = read_trl(work) if SYSTEMS[system] is None else read_rl_train(work)
            if not figures["curve"]:
                raise ValueError("no evaluation points")
        except (OSError, KeyError, ValueError, IndexError) as exc:
            return {**record, "ok": False, "error": f"unreadable output ({type(exc).__name__}: {exc})\n{tail}"}
    return {**record, "ok": True, **with_rates(figures)}


def command_key(system: str, shared: list[str], seed: int) -> list[str]:
    """What makes a run what it is: on --resume, a stored run counts only if this matches."""
    own = ["(trl_baseline.py)"] if SYSTEMS[system] is None else SYSTEMS[system]
    return [*shared, *own, f"seed={seed}"]


# ---- the benchmark -----------------------------------------------------------------------------


def start_result(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The result skeleton, or the stored one with --resume (its runs kept for matching)."""
    previous = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else {}
    return {
        "benchmark": "end to end: TRL GRPOTrainer vs rl-train sync / APRIL / APRIL pipelined",
        "machine": machine(),
        "config": {"workloads": args.workloads, "systems": {s: SYSTEMS[s] for s in args.systems},
                   "seeds": args.seeds, "target_fraction": args.target_fraction, "steps_toy": args.steps_toy,
                   "steps_long": args.steps_long, "set": args.set, "run_timeout": args.run_timeout,
                   "argv": argv},
        "load_average_start": os.getloadavg(),
        "workloads": previous.get("workloads", {}),
        "bench_wall_seconds": previous.get("bench_wall_seconds", 0.0),
    }


def refresh(entry: dict[str, Any], args: argparse.Namespace) -> None:
    """Recompute a workload's target and summaries from its runs of the selected systems and seeds."""
    runs = {s: [entry["runs"][s][str(seed)] for seed in args.seeds if str(seed) in entry["runs"].get(s, {})]
            for s in args.systems}
    entry.pop("speedup_note", None)  # a note from an earlier summary must not outlive it
    entry.update(summarize_workload(runs, args.target_fraction, baseline=BASELINE))


def bench_workload(name: str, args: argparse.Namespace, result: dict[str, Any], clock: float) -> None:
    """All runs of one workload, seeds outermost; the JSON is saved after each run."""
    recipe = ROOT / WORKLOADS[name]["recipe"]
    entry = result["workloads"].setdefault(name, {})
    try:
        shared = workload_overrides(name, args)
        entry.update(recipe=WORKLOADS[name]["recipe"], overrides=shared, settings=resolved_settings(name, shared))
        entry.pop("error", None)
    except Exception as exc:  # a missing or invalid recipe: the other workload still runs
        entry["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{name}: skipped: {entry['error']}", file=sys.stderr)
        return
    entry.setdefault("runs", {})
    for seed in args.seeds:
        for system in args.systems:
            stored = entry["runs"].setdefault(system, {}).get(str(seed), {})
            if stored.get("ok") and stored.get("overrides") == command_key(system, shared, seed):
                continue
            print(f"{name} seed {seed} {system}: running", file=sys.stderr, flush=True)
            run = run_one(system, recipe, shared, seed, args.run_timeout)
            entry["runs"][system][str(seed)] = run
            print(f"{name} seed {seed} {system}: " + (
                f"{run['seconds_per_step']:.2f} s/step, accuracy {run['curve'][0]['accuracy']:.3f} -> "
                f"{run['curve'][-1]['accuracy']:.3f}" if run["ok"] else
                f"FAILED (exit {run['returncode']}): {run['error'].strip().splitlines()[-1:]}"),
                file=sys.stderr, flush=True)
            refresh(entry, args)
            result["bench_wall_seconds"] = round(clock + time.perf_counter(), 1)
            save_json(result, args.out)
    refresh(entry, args)


def fmt(figure: dict[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    """'median (min-max)' of a spread, '-' for missing values, 'never' for an infinite median."""
    if not figure or figure["n"] == 0:
        return "-"
    show = lambda v: "never" if v is None else f"{v * scale:.{digits}f}"  # noqa: E731
    return f"{show(figure['median'])} ({show(figure['min'])}-{show(figure['max'])})"


def print_table(result: dict[str, Any]) -> None:
    """A compact table per workload: the figures and ratios the JSON holds."""
    for name, entry in result["workloads"].items():
        if "error" in entry or "systems" not in entry:
            print(f"\n{name}: {entry.get('error', 'no runs')}")
            continue
        t = entry["target"]
        head = (f"target {t['accuracy']:.1%} = {t['initial']:.1%} + {t['fraction']} x ({t['best_final']:.1%} "
                f"best final, {t['best_system']} - initial)" if t["accuracy"] is not None else t["note"])
        print(f"\n{name} ({entry['recipe']}): {head}")
        print(f"{'system':15s} {'s/step':>18s} {'trained tok/s':>20s} {'generated tok/s':>20s} "
              f"{'s to target':>22s} {'reached':>7s} {'final accuracy %':>20s} failed")
        for system, s in entry["systems"].items():
            ok = s["runs"] - s["failed"]
            print(f"{system:15s} {fmt(s['seconds_per_step']):>18s} {fmt(s['completion_tokens_per_s'], digits=0):>20s} "
                  f"{fmt(s['generated_tokens_per_s'], digits=0):>20s} {fmt(s['seconds_to_target'], digits=1):>22s} "
                  f"{s['reached']:>3d}/{ok:<3d} {fmt(s['final_accuracy'], 100, 1):>20s} {s['failed']}")
        print(f"speedup_to_target ({BASELINE} / best rl-train, {entry['speedup_best_system']}): "
              f"{entry['speedup_to_target']}"
              f"{'  (' + entry['speedup_note'] + ')' if 'speedup_note' in entry else ''}"
              f"{'; at least ' + str(entry['speedup_to_target_at_least']) if 'speedup_to_target_at_least' in entry else ''};  "
              f"pipeline_vs_april_seconds_per_step: {entry['pipeline_vs_april_seconds_per_step']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = start_result(args, argv)
    clock = result["bench_wall_seconds"] - time.perf_counter()  # resumed benchmarks add up
    for name in args.workloads:
        bench_workload(name, args, result, clock)
    result["load_average_end"] = os.getloadavg()
    result["bench_wall_seconds"] = round(clock + time.perf_counter(), 1)
    save_json(result, args.out)
    print_table(result)
    print(f"\nwrote {args.out} ({result['bench_wall_seconds']:.0f} s of benchmark)")


if __name__ == "__main__":
    main()
