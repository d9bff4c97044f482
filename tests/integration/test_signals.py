"""Stopped on purpose: real SIGINT / SIGTERM sent to real `rl-train` processes.

Ctrl-C (sent to the whole process group, as a terminal does) stops at a safe point with a
checkpoint holding the buffer, one line with the command that continues the run, exit 130; the
run continues exactly from it. SIGTERM during an update finishes the step, saves, exits 143. A
second Ctrl-C exits at once; Ctrl-C during the engine start exits cleanly. No process outlives
its run in any case.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_chaos import chaos

from rollover.trainer.checkpoint import checkpoint_problem, find_checkpoint
from rollover.trainer.config import load_recipe

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["rollout.groups_per_step=4", "rollout.group_size=4", "rollout.over_provision=2",
         "rollout.max_tokens=40", "task.eval_size=8", "train.eval_every=1000", "train.save_every=1000",
         "train.updates_per_batch=2", "tracking.wandb=disabled", "algo.dynamic_sampling=false"]
STOPPED = re.compile(r"^rl-train: stopped by (SIG\w+) at step (\d+); checkpoint (\S+) written; "
                     r"continue with: (.+)$")


class Run:
    """A real rl-train in its own process group, with its descendants recorded while it runs."""

    started: list["Run"] = []  # killed when their test ends, so a failed test leaves no run behind

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        Run.started.append(self)
        self.proc = subprocess.Popen([sys.executable, "-m", "rollover.trainer.cli", *args], cwd=ROOT,
                                     env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}
        self.names: dict[int, str] = {}

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            chaos.record(self.proc, self.seen, self.names)
            assert self.proc.poll() is None, self.proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
        chaos.record(self.proc, self.seen, self.names)

    def engine_pids(self) -> list[int]:
        """The run's live engine processes. A pid recorded with the engine's name may be gone: a
        child the engine forks (for a subprocess it runs) carries its name until it execs."""
        return [pid for pid, name in self.names.items()
                if name == "VLLM::EngineCore" and chaos.still_running(self.seen[pid])]

    def finish(self, timeout: float = 120) -> tuple[int, str, list[str]]:
        """(exit status, output, processes of the run still alive 20 s after it ended)."""
        self.proc.wait(timeout=timeout)  # its output is a few lines: the pipe cannot fill
        self.exited_at = time.monotonic()
        left, _ = chaos.left_running(self.seen, self.names, time.monotonic(), 20)
        return self.proc.returncode, self.proc.communicate()[0], left


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    yield
    for run in Run.started:
        if run.proc.poll() is None:  # the test failed before stopping it: it would compete with the next
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
    Run.started.clear()


def recipe_args(out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "recipes/grpo_math.yaml"), *SMALL, f"train.output_dir={out}", *extra]


def trained_steps(out: Path) -> int:
    path = out / "trained_uids.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def rl_train_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("rl-train")]


def sigint_blocked(pid: int) -> bool:
    mask = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigBlk:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)


def test_ctrl_c_stops_with_a_checkpoint_and_the_command_that_continues_exactly(tmp_path):
    out = tmp_path / "run"
    run = Run(recipe_args(out, "train.steps=200"))
    run.wait_for(lambda: trained_steps(out) >= 2)
    assert run.engine_pids() and all(sigint_blocked(pid) for pid in run.engine_pids())
    os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
    status, output, left = run.finish()

    assert status == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    lines = rl_train_lines(output)
    assert len(lines) == 1 and STOPPED.match(lines[0]), output[-3000:]
    name, step, checkpoint, command = STOPPED.match(lines[0]).groups()
    step = int(step)
    assert name == "SIGINT" and step >= 2 and not left
    # The checkpoint is the state between steps at the stop (save_every is 1000): complete, the
    # one a resume takes, holding the groups the stop cut short.
    assert Path(checkpoint) == out / "checkpoints" / f"step-{step:06d}"
    assert checkpoint_problem(Path(checkpoint)) is None and find_checkpoint(out) == (Path(checkpoint), [])
    saved = state(Path(checkpoint))
    assert saved["step"] == step
    buffered = {g["uid"] for g in saved["scheduler"]["buffer"]["groups"]}
    assert buffered, "the cancelled rollout's groups must be in the checkpoint's buffer"
    assert all(chaos.conservation(out)["checks"].values())

    # The printed command continues the run: the same overrides, resume. This resumed run gets a
    # SIGTERM in its second step's update: it finishes that step, saves, and exits 143.
    words = shlex.split(command)
    assert words[:2] == ["rl-train", str(ROOT / "recipes/grpo_math.yaml")]
    first_args = recipe_args(out, "train.steps=200", "train.resume=true")
    assert load_recipe(words[1], words[2:]) == load_recipe(first_args[0], first_args[1:])
    resumed = Run(words[1:], env={"ROLLOVER_FAILPOINT": f"update:{step + 2}:TERM"})
    status, output, left = resumed.finish(timeout=300)
    assert status == 143, output[-3000:]
    lines = rl_train_lines(output)
    assert len(lines) == 1 and STOPPED.match(lines[0]).groups()[:2] == ("SIGTERM", str(step + 2)), lines
    assert f"resumed from {checkpoint} at step {step}" in output and not left
    final = chaos.conservation(out)
    assert final["steps"] == step + 2 and all(final["checks"].values()), final
    after = state(out / "checkpoints" / f"step-{step + 2:06d}")["scheduler"]["ledger"]["place"]
    assert any(after[str(uid)] == "returned" for uid in buffered), "the saved buffer was not resumed"


def test_a_second_ctrl_c_exits_at_once_and_leaves_no_engine(tmp_path):
    out = tmp_path / "run"
    run = Run(recipe_args(out, "train.steps=200"))
    run.wait_for(lambda: trained_steps(out) >= 1)
    engines = run.engine_pids()
    assert engines
    os.kill(run.proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(run.proc.pid, signal.SIGINT)
    second = time.monotonic()
    status, output, left = run.finish(timeout=30)
    assert status == 130 and run.exited_at - second < 5, output[-3000:]
    *first, last = rl_train_lines(output)
    assert last == "rl-train: second SIGINT: exiting now; the last complete checkpoint is kept"
    # The first stop may have finished its checkpoint (then said so) before the second came.
    assert len(first) <= 1 and all(STOPPED.match(line) for line in first), output[-3000:]
    assert "Traceback" not in output
    assert not left, left  # the watchdog stopped the engine the exit left behind


def test_ctrl_c_during_the_engine_start_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    run = Run(recipe_args(out, "train.steps=200"))
    run.wait_for(lambda: chaos.engine_started(run.seen, run.names))
    os.killpg(run.proc.pid, signal.SIGINT)
    status, output, left = run.finish(timeout=60)
    assert status == 130, output[-3000:]
    assert rl_train_lines(output) == ["rl-train: stopped by SIGINT before training started; "
                                      "no checkpoint was written"], output[-3000:]
    assert "Traceback" not in output and not left, left
    assert not out.exists()  # a run that never started leaves no folder
