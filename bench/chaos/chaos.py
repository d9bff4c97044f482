"""Killed anywhere, resumed exactly: SIGKILL `rl-train` again and again, resume it each time, check.

Each round resumes the run (`train.resume=true`, a checkpoint every step) and kills it with
SIGKILL at one moment, chosen per round:
- `random`: a random time (0-1.5 s) after the resumed run's first new checkpoint, so it lands
  anywhere in a step: rollout, update, weight sync, evaluation, checkpoint write;
- `startup`: a random time (0-8 s) after the engine's first process appears: the engine start;
- `rollout`, `update`, `weight_sync`, `checkpoint_write`: ROLLOVER_FAILPOINT (trainer/runtime/failpoints.py)
  kills it inside that phase of the second step after the resume: these phases take tens of
  milliseconds here, which a timed kill rarely hits.
After each kill: every process the run started (the vLLM engine's included) must be gone within
`ORPHAN_TIMEOUT_S`, no weights file is left in shared memory, and the checkpoint a resume would
take is complete (a checkpoint cut mid-write is only a `.tmp-*` folder). A last resume with
nothing left to train starts vLLM from the final checkpoint and must end normally. Then, from
that checkpoint's ledger and the run's `trained_uids.jsonl`: one entry per step (none twice, none
skipped), and every drawn uid trained exactly once, buffered, or dropped with a reason; the final
checkpoint loads in transformers.

    python -m bench.chaos.chaos --kills 10 --seed 0      # writes bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from bench.common import RESULTS, ROOT, save_json
from rollover.trainer.checkpoint import STATE_FILE, checkpoint_dir, checkpoint_problem, find_checkpoint
from rollover.trainer.runtime.uid_log import read_trained
from rollover.trainer.runtime.watchdog import WEIGHTS_FILES, cmdline

GROUPS = 4
OVERRIDES = [
    f"rollout.groups_per_step={GROUPS}", "rollout.group_size=4", "rollout.over_provision=2",
    "rollout.max_tokens=40", "task.eval_size=8", "train.eval_every=3", "train.save_every=1",
    "train.keep_checkpoints=2", "train.updates_per_batch=2", "tracking.wandb=disabled",
]  # dynamic sampling stays on: groups it rejects are dropped with a reason ("filtered")
FAILPOINTS = ("rollout", "update", "weight_sync", "checkpoint_write")
ROUND_TIMEOUT_S = 300
ORPHAN_TIMEOUT_S = 20


def plan(kills: int, seed: int) -> list[str]:
    """Every failpoint once, one startup kill, the rest random-time kills; shuffled by `seed`."""
    kinds = list(FAILPOINTS) + ["startup"]
    kinds += ["random"] * max(0, kills - len(kinds))
    random.Random(seed).shuffle(kinds)
    return kinds[:kills] if kills < len(kinds) else kinds


def rl_train(run_dir: Path, steps: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"),
         f"train.output_dir={run_dir}", "train.resume=true", f"train.steps={steps}", *OVERRIDES],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)


def latest_step(run_dir: Path) -> int:
    """The step of the checkpoint a resume would take (0 without one)."""
    found, _ = find_checkpoint(run_dir)
    return torch.load(found / STATE_FILE, map_location="cpu", weights_only=False)["step"] if found else 0


def pointer_step(run_dir: Path) -> int:
    """The step `latest` names right now (cheap: no hashing), 0 without one."""
    try:
        return int((checkpoint_dir(run_dir) / "latest").read_text().strip().removeprefix("step-"))
    except (OSError, ValueError):
        return 0


def record(proc: subprocess.Popen, seen: dict[int, psutil.Process], names: dict[int, str]) -> None:
    """Add the run's current descendants to `seen`, with their current names (vLLM renames its
    processes after they start)."""
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(child.pid, child)
            names[child.pid] = child.name()
    except psutil.Error:
        pass


def engine_started(seen: dict[int, psutil.Process], names: dict[int, str]) -> bool:
    """Whether a vLLM engine process was started (spawned, or already renamed `VLLM::...`)."""
    return any(names.get(pid, "").startswith("VLLM") or "spawn_main" in " ".join(cmdline(p))
               for pid, p in seen.items())


def still_running(proc: psutil.Process) -> bool:
    """Running and not a zombie (a pid seen once may have exited, or be reused)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def left_running(seen: dict[int, psutil.Process], names: dict[int, str], since: float,
                 timeout: float) -> tuple[list[str], float]:
    """(the run's processes still alive `timeout` s after `since`, seconds until all were gone)."""
    while True:
        alive = [p for p in seen.values() if still_running(p)]
        waited = time.monotonic() - since
        if not alive or waited > timeout:
            return [f"{names.get(p.pid, '?')} (pid {p.pid})" for p in alive], round(waited, 2)
        time.sleep(0.05)


def kill_round(run_dir: Path, kind: str, rng: random.Random, steps: int) -> dict[str, Any]:
    """Resume the run, SIGKILL it as `kind` says, and check what it left behind."""
    before = latest_step(run_dir)
    env = {"ROLLOVER_FAILPOINT": f"{kind}:{before + 2}"} if kind in FAILPOINTS else {}
    started = time.monotonic()
    proc = rl_train(run_dir, steps, env)
    seen: dict[int, psutil.Process] = {}
    names: dict[int, str] = {}
    kill_at = None
    killed_after = None
    while proc.poll() is None:
        record(proc, seen, names)
        now = time.monotonic()
        if kind == "random" and kill_at is None and pointer_step(run_dir) > before:
            kill_at = now + rng.uniform(0, 1.5)  # training is under way
        if kind == "startup" and kill_at is None and engine_started(seen, names):
            kill_at = now + rng.uniform(0, 8)  # it is up ~15 s after its first process starts
        if kill_at is not None and now >= kill_at and killed_after is None:
            proc.send_signal(signal.SIGKILL)
            killed_after = round(now - started, 2)
        if now - started > ROUND_TIMEOUT_S:
            proc.kill()
            break
        time.sleep(0.05)
    leftover, cleanup_s = left_running(seen, names, time.monotonic(), ORPHAN_TIMEOUT_S)
    output = proc.communicate()[0]
    weights = sorted(p.name for d in (Path("/dev/shm"), Path(tempfile.gettempdir())) if d.is_dir()
                     for p in d.glob(WEIGHTS_FILES.format(pid=proc.pid)))
    found, skipped = find_checkpoint(run_dir)
    pointer = checkpoint_dir(run_dir) / "latest"
    named = checkpoint_dir(run_dir) / pointer.read_text().strip() if pointer.is_file() else None
    return {
        "kind": kind, "returncode": proc.returncode, "killed_after_s": killed_after,
        "seconds": round(time.monotonic() - started, 1), "step_before": before,
        "step_after": latest_step(run_dir),
        "engines_seen": sum(n.startswith("VLLM") for n in names.values()),
        "processes_seen": len(seen), "left_running": leftover, "cleanup_s": cleanup_s,
        "watchdog": [line for line in output.splitlines() if "watchdog" in line],
        "weights_files_left": weights,
        "cut_checkpoints": sorted(p.name for p in checkpoint_dir(run_dir).glob(".tmp-*")),
        "resume_checkpoint_complete": found is None or checkpoint_problem(found) is None,
        "latest_complete": named is None or checkpoint_problem(named) is None,
        "skipped": [f"{p.name}: {why}" for p, why in skipped],
        "output_tail": output[-1500:] if proc.returncode != -signal.SIGKILL else "",
    }


def conservation(run_dir: Path) -> dict[str, Any]:
    """Check the final checkpoint's ledger against the uid log (see the module doc)."""
    final, _ = find_checkpoint(run_dir)
    state = torch.load(final / STATE_FILE, map_location="cpu", weights_only=False)
    steps = state["step"]
    log = read_trained(run_dir)
    trained = [u for _, uids in log for u in uids]
    ledger = state["scheduler"]["ledger"]
    place = {int(u): p for u, p in ledger["place"].items()}
    reasons = {int(u): r for u, r in ledger["reason"].items()}
    buffered = {g["uid"] for g in state["scheduler"]["buffer"]["groups"]}
    train_lines = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "time/step" in json.loads(line)]
    checks = {
        "one_log_entry_per_step": [s for s, _ in log] == list(range(1, steps + 1)),
        "one_metrics_line_per_step": train_lines == list(range(1, steps + 1)),
        "groups_per_step": all(len(uids) == GROUPS for _, uids in log),
        "no_uid_trained_twice": len(trained) == len(set(trained)),
        "trained_equals_returned": set(trained) == {u for u, p in place.items() if p == "returned"},
        "buffered_equals_buffer": buffered == {u for u, p in place.items() if p == "buffered"},
        "dropped_have_reasons": all(u in reasons for u, p in place.items() if p == "dropped"),
        "nothing_in_flight": "in_flight" not in place.values(),
        "every_draw_accounted": sorted(place) == list(range(state["prompt_cursor"])),
    }
    counts = {p: sum(v == p for v in place.values()) for p in ("returned", "buffered", "dropped")}
    return {"final_checkpoint": final.name, "steps": steps, "drawn": state["prompt_cursor"],
            **counts, "drop_reasons": sorted(set(reasons.values())), "checks": checks}


def loads_in_transformers(checkpoint: Path) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return sum(p.numel() for p in model.parameters()) > 0


def chaos(run_dir: Path, kills: int, seed: int) -> dict[str, Any]:
    """Run the whole experiment in `run_dir`; returns the report (see `checks`)."""
    started = time.monotonic()
    rng = random.Random(seed)
    rounds = []
    for kind in plan(kills, seed):
        rounds.append(kill_round(run_dir, kind, rng, steps=1000))
        print(json.dumps({k: v for k, v in rounds[-1].items() if k != "output_tail"}), flush=True)
    final_step = latest_step(run_dir)
    last = rl_train(run_dir, steps=final_step)  # nothing to train: vLLM starts from the final checkpoint
    last_output = last.communicate(timeout=ROUND_TIMEOUT_S)[0]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = conservation(run_dir)
    checks = {
        "all_killed_by_sigkill": all(r["returncode"] == -signal.SIGKILL for r in rounds),
        "no_process_left_running": all(not r["left_running"] for r in rounds),
        "engines_were_running": sum(r["engines_seen"] > 0 for r in rounds) >= kills - 1,
        "no_weights_file_left": all(not r["weights_files_left"] for r in rounds),
        "resume_point_always_complete": all(r["resume_checkpoint_complete"] for r in rounds),
        "latest_always_complete": all(r["latest_complete"] for r in rounds),
        "cut_checkpoint_seen_and_not_taken": any(
            r["kind"] == "checkpoint_write" and r["cut_checkpoints"] and r["step_after"] < r["step_before"] + 2
            for r in rounds),
        "progress": final_step > 0,
        "drops_were_exercised": final["dropped"] > 0,  # dynamic sampling's rejections
        "final_resume_ok": last.returncode == 0,
        "final_loads_in_vllm": any(m.get("step") == final_step and "resume_eval/accuracy" in m
                                   for m in metrics),
        "final_loads_in_transformers": loads_in_transformers(run_dir / "checkpoints" / final["final_checkpoint"]),
        **final.pop("checks"),
    }
    return {"kills": kills, "seed": seed, "wall_seconds": round(time.monotonic() - started, 1),
            "rounds": rounds, "final": final, "final_output_tail": last_output[-1500:],
            "checks": checks, "ok": all(checks.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, help="the run folder (default: a fresh temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="rollover-chaos-")) / "run"
    report = chaos(run_dir, args.kills, args.seed)
    save_json(report, args.out)
    print(json.dumps({"ok": report["ok"], "checks": report["checks"], "wall_seconds": report["wall_seconds"]},
                     indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
