"""`rl-train` with two trainer ranks (`train.world_size=2`, FSDP2 over gloo): it trains, every
weight sync is proven by the probe, and a trainer rank killed mid-run ends the run in one line
with its checkpoints intact and no process left. (Exact resume across world sizes, and the
update's parity with one process: tests/unit/test_sharded_resume.py, test_fsdp_parity.py.)
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from test_signals import Run, recipe_args, rl_train_lines, trained_steps

from rollover.trainer.checkpoint import checkpoint_problem, find_checkpoint

pytestmark = pytest.mark.integration

RANK_1 = "rollover::rank1"  # the follower's process name (trainer/distributed/launch.py)


def test_two_trainer_ranks_train_and_a_killed_rank_ends_the_run_in_one_line(tmp_path):
    out = tmp_path / "run"
    run = Run(recipe_args(out, "train.world_size=2", "train.steps=1000", "train.save_every=1"))
    try:
        run.wait_for(lambda: trained_steps(out) >= 2 and RANK_1 in run.names.values(), timeout=300)
    except BaseException:
        run.proc.kill()
        raise
    follower = next(pid for pid, name in run.names.items() if name == RANK_1)
    os.kill(follower, signal.SIGKILL)
    status, output, left = run.finish()
    lines = rl_train_lines(output)
    assert status == 1 and len(lines) == 1, output[-3000:]
    assert "trainer rank 1 is gone (exit code -9)" in lines[0] and "is intact" in lines[0], lines
    assert "Traceback" not in output
    assert not left, left
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) >= 2 and all(s["weights/fingerprint_ok"] == 1.0 and s["updates"] >= 1 for s in steps)
    checkpoint, skipped = find_checkpoint(out)
    assert checkpoint is not None and not skipped and checkpoint_problem(checkpoint) is None
    assert {"__0_0.distcp", "__1_0.distcp"} <= {f.name for f in (checkpoint / "dcp").iterdir()}  # each rank's shards
