"""Does `rl-train` learn the same with 2 trainer ranks as with one? The demo, side by side.

Runs `recipes/grpo_math.yaml` (builtin:tiny-math, arithmetic) with `train.world_size` 1 and 2,
the same seed and step budget, one run at a time, alternating per repeat so machine noise falls
on both. Per run: the held-out accuracy curve (summary.json), the step's time split from
metrics.jsonl (rollout, update, weight sync), and the weight sync's share of a step — with 2
ranks the sync gathers every parameter from the shards before the push.

On 2 cores, 2 ranks cannot be faster than one (the ranks and the engine share the cores): this
measures that the sharded trainer learns the same and what the gather costs, not a speed-up.

    python -m bench.trainer.ranks_learn [--steps 60 --repeats 1 --out FILE]
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

DEFAULT_OUT = RESULTS / "ranks_learn.json"
SHARED = ["tracking.wandb=disabled", "task.eval_size=256"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def median_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return round(statistics.median(values), 4) if values else None


def one_run(world_size: int, steps: int, eval_every: int, work: Path) -> dict:
    out = work / f"ws{world_size}"
    command = [sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"), *SHARED,
               f"train.world_size={world_size}", f"train.steps={steps}", f"train.eval_every={eval_every}",
               f"train.save_every={steps}", f"train.output_dir={out}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "160"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"ok": False, "returncode": done.returncode, "tail": (done.stdout + done.stderr)[-2000:]}
    summary = json.loads((out / "summary.json").read_text())
    steps_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                    if '"time/step"' in line]
    sync_share = [s["time/weight_sync"] / s["time/step"] for s in steps_logged if s.get("time/step")]
    return {"ok": True, "process_wall_s": round(wall, 1), "train_wall_s": summary["wall_seconds"],
            "eval_curve": [(e["step"], e["accuracy"]) for e in summary["eval_curve"]],
            "accuracy_first": summary["eval_accuracy_first"], "accuracy_last": summary["eval_accuracy_last"],
            "step_s": median_of(steps_logged, "time/step"), "rollout_s": median_of(steps_logged, "time/rollout"),
            "train_s": median_of(steps_logged, "time/train"), "weight_sync_s": median_of(steps_logged, "time/weight_sync"),
            "weight_sync_share": round(statistics.median(sync_share), 4) if sync_share else None,
            "probe_ok_steps": sum(s.get("weights/fingerprint_ok") == 1.0 for s in steps_logged),
            "steps_logged": len(steps_logged)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    result = {"benchmark": "ranks_learn", "machine": machine(), "recipe": "recipes/grpo_math.yaml",
              "settings": {"steps": args.steps, "eval_every": args.eval_every, "shared": SHARED,
                           "repeats": args.repeats}, "runs": {str(w): [] for w in world_sizes}}
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ranks_learn_") as tmp:
        for repeat in range(args.repeats):
            for world_size in world_sizes:
                run = one_run(world_size, args.steps, args.eval_every, Path(tmp) / f"r{repeat}")
                result["runs"][str(world_size)].append(run)
                print(f"world_size {world_size} repeat {repeat}: "
                      + (f"accuracy {run['accuracy_first']:.3f} -> {run['accuracy_last']:.3f}, "
                         f"{run['step_s']} s/step, sync {run['weight_sync_s']} s "
                         f"({run['weight_sync_share']:.1%} of a step)" if run["ok"] else f"failed: {run['tail'][-300:]}"),
                      flush=True)
                save_json(result, args.out)
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    result["bench_wall_s"] = round(time.perf_counter() - clock, 1)
    save_json(result, args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
