"""Kill a real training run with SIGKILL after a checkpoint, resume it, and check nothing is lost.

Runs `rl-train` as users do (subprocesses, real vLLM engine on CPU, real files).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rollover.trainer.runtime.uid_log import read_trained

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GROUPS, UPDATES = 4, 2
COMMON = [
    "rollout.groups_per_step=4", "rollout.group_size=4", "rollout.over_provision=2",
    "rollout.max_tokens=40", "task.eval_size=24", "train.eval_every=2", "train.save_every=2",
    f"train.updates_per_batch={UPDATES}", "train.lr=1e-3",  # large steps: weights clearly move
    "tracking.wandb=disabled", "algo.dynamic_sampling=false",
]


def rl_train(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"),
         f"train.output_dir={out}", *COMMON, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def places(ledger: dict) -> dict[int, str]:
    return {int(uid): place for uid, place in ledger["place"].items()}


@pytest.mark.parametrize("max_async", [0, 2])
def test_sigkill_after_checkpoint_then_resume(tmp_path, max_async):
    out = tmp_path / "run"
    pipeline = f"rollout.max_async={max_async}"  # 2: the kill lands while batches run ahead
    first = rl_train(out, "train.steps=20", pipeline)
    pointer = out / "checkpoints" / "latest"
    deadline = time.time() + 400
    while not (pointer.is_file() and pointer.read_text().strip() == "step-000002"):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint at step 2 in time"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the trainer and its engine processes, mid-step 3
    first.wait(timeout=60)

    saved = state(out / "checkpoints" / "step-000002")
    assert saved["step"] == 2
    before = places(saved["scheduler"]["ledger"])
    buffered_before = {u for u, p in before.items() if p == "buffered"}
    assert sum(p == "returned" for p in before.values()) == 2 * GROUPS
    assert buffered_before, "over-provisioned rollouts should leave partial groups in the buffer"
    assert {g["uid"] for g in saved["scheduler"]["buffer"]["groups"]} == buffered_before
    eval_before = [m for m in metrics(out) if m["step"] == 2 and "eval/accuracy" in m][0]

    resumed = rl_train(out, "train.steps=4", "train.resume=true", pipeline)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    assert "resumed from" in log and "step 2" in log

    final = state(out / "checkpoints" / "step-000004")
    after = places(final["scheduler"]["ledger"])
    # The step counter and optimizer continue: 2 more steps, UPDATES optimizer updates each.
    assert final["step"] == 4
    adam_steps = {int(s["step"]) for s in final["optimizer"]["state"].values()}
    assert adam_steps == {4 * UPDATES}
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {2 * UPDATES}
    # Nothing lost or repeated: every uid known at the checkpoint is still accounted for, returned
    # groups stay returned, exactly N groups per step were trained, and uids were drawn in order.
    assert set(before) <= set(after)
    assert all(after[u] == "returned" for u, p in before.items() if p == "returned")
    assert all(after[u] in ("returned", "buffered", "dropped") for u in buffered_before)
    assert sum(p == "returned" for p in after.values()) == 4 * GROUPS
    assert sorted(after) == list(range(final["prompt_cursor"]))
    assert final["prompt_cursor"] >= saved["prompt_cursor"]
    # The uids trained per step: one entry per step although step 3 may have been trained (and
    # logged) before the kill, and exactly the groups the ledger says were returned.
    log = read_trained(out)
    assert [step for step, _ in log] == [1, 2, 3, 4]
    assert sorted(u for _, uids in log for u in uids) == sorted(u for u, p in after.items() if p == "returned")
    resumed_groups = {u for u in buffered_before if after[u] != "buffered"}
    assert resumed_groups, "the partial buffer saved at step 2 was not used after the resume"
    # The engine serves the checkpoint's weights: greedy eval right after the resume matches the
    # eval the killed run made at step 2 with those weights.
    check = [m for m in metrics(out) if "resume_eval/accuracy" in m][0]
    assert check["step"] == 2
    assert check["resume_eval/accuracy"] == eval_before["eval/accuracy"]
    assert check["resume_eval/mean_length"] == eval_before["eval/mean_length"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and [e["step"] for e in summary["eval_curve"]] == [0, 2, 4]
