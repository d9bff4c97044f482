"""End to end: TRL's GRPOTrainer vs rl-train (synchronous) vs rl-train (APRIL), on the same work.

Same model (builtin:tiny-math), task (built-in arithmetic, same seed and held-out set), prompts
per step, group size, token budget and learning rate. Each system runs in its own process, one
after the other, on this machine. Clocks count training only (rollout + update + weight sync),
from the first step, excluding evaluation and start-up, for all three. Reports seconds per
step, completion tokens/s, and the training wall time until held-out greedy accuracy first
reaches the target.

    python bench/e2e_vs_trl.py [--steps 60] [--target-accuracy 0.55] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "gpu": None}


def time_to_target(curve: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation at or above `target` (None if never)."""
    return next((point["wall_seconds"] for point in curve if point["accuracy"] >= target), None)


def run_trl(args, work: Path) -> dict:
    out = work / "trl.json"
    subprocess.run([sys.executable, str(ROOT / "bench/trl_baseline.py"), "--steps", str(args.steps),
                    "--groups-per-step", str(args.groups_per_step), "--group-size", str(args.group_size),
                    "--max-tokens", str(args.max_tokens), "--lr", str(args.lr),
                    "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size),
                    "--out", str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    steps = max(result["config"]["steps_done"], 1)
    return {"curve": [{"step": p["step"], "wall_seconds": p["wall_seconds"], "accuracy": p["accuracy"]}
                      for p in result["curve"]],
            "seconds_per_step": result["train_wall_seconds"] / steps,
            "completion_tokens_per_s": result["completion_tokens"] / max(result["train_wall_seconds"], 1e-9),
            "train_wall_seconds": result["train_wall_seconds"]}


def run_rl_train(args, work: Path, name: str, overrides: list[str]) -> dict:
    out = work / name
    command = [sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"),
               f"train.output_dir={out}", f"train.steps={args.steps}", f"train.lr={args.lr}",
               f"train.eval_every={args.eval_every}", f"train.save_every={args.steps}",
               f"task.eval_size={args.eval_size}", f"rollout.groups_per_step={args.groups_per_step}",
               f"rollout.group_size={args.group_size}", f"rollout.max_tokens={args.max_tokens}",
               "tracking.wandb=disabled", *overrides]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "rollout/useful_tokens" in m]
    tokens = sum(m["rollout/useful_tokens"] for m in steps)
    return {"curve": [{"step": e["step"], "wall_seconds": e["train_seconds"], "accuracy": e["accuracy"]}
                      for e in summary["eval_curve"]],
            "seconds_per_step": summary["wall_seconds"] / max(summary["steps"], 1),
            "completion_tokens_per_s": tokens / max(summary["wall_seconds"], 1e-9),
            "generated_tokens_per_s": sum(m["rollout/generated_tokens"] for m in steps)
            / max(summary["wall_seconds"], 1e-9),
            "train_wall_seconds": summary["wall_seconds"], "overrides": overrides}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--groups-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--target-accuracy", type=float, default=0.55)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/e2e_vs_trl.json")
    args = parser.parse_args()

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        work = Path(tmp)
        runs = {
            "trl": run_trl(args, work),
            "sync": run_rl_train(args, work, "sync", ["rollout.over_provision=1", "rollout.partial=false"]),
            "april": run_rl_train(args, work, "april", []),
        }
    for run in runs.values():
        run["seconds_to_target"] = time_to_target(run["curve"], args.target_accuracy)
        run["accuracy_last"] = run["curve"][-1]["accuracy"]
    result = {
        "benchmark": "end to end: TRL GRPOTrainer vs rl-train sync vs rl-train APRIL",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "speedup_to_target": ratio(runs["trl"]["seconds_to_target"], runs["april"]["seconds_to_target"]),
        "april_vs_sync_to_target": ratio(runs["sync"]["seconds_to_target"], runs["april"]["seconds_to_target"]),
        "seconds_per_step_ratio_trl_over_april": ratio(runs["trl"]["seconds_per_step"],
                                                       runs["april"]["seconds_per_step"]),
        "runs": runs,
        "machine": machine(),
        "bench_wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for name, run in runs.items():
        print(f"{name:6s} {run['seconds_per_step']:.2f} s/step  {run['completion_tokens_per_s']:.0f} tok/s  "
              f"to target: {run['seconds_to_target']}  curve: {[p['accuracy'] for p in run['curve']]}")


if __name__ == "__main__":
    main()
