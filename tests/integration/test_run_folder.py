"""A run folder belongs to one run: real rl-train processes, real files, real locks."""

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

from rollover.trainer.runtime.run_folder import LOCK_FILE

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def rl_train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"),
         "tracking.wandb=disabled", *overrides],
        capture_output=True, text=True, timeout=300, cwd=ROOT)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_folder_holding_a_run_is_refused_unless_resuming(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000010").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.name for p in out.rglob("*"))
    line = one_line_error(rl_train(f"train.output_dir={out}"))
    assert "already holds a run (1 checkpoint (last step-000010), metrics.jsonl)" in line
    assert "train.resume=true" in line and "another train.output_dir" in line
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched


def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as held:  # what a running rl-train holds
        held.write("4242")
        held.flush()
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = one_line_error(rl_train(f"train.output_dir={out}", "train.resume=true"))
    assert "is in use by another rl-train (pid 4242)" in line


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    out = tmp_path / "fresh"
    result = rl_train(f"train.output_dir={out}", "task.rewards=[{fn: 'no_such_module:reward'}]")
    assert "cannot import 'no_such_module:reward'" in one_line_error(result)
    assert not out.exists()


def test_resume_refuses_changed_meaning_before_the_engine_starts(tmp_path):
    out = tmp_path / "run"
    saved = subprocess.run([sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"),
                            f"train.output_dir={out}", "--print-config"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    checkpoint = out / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"")
    (out / "recipe.yaml").write_text(saved)
    result = rl_train(f"train.output_dir={out}", "train.resume=true", "rollout.group_size=4",
                      "train.lora.enabled=true")
    line = one_line_error(result)
    assert "rollout.group_size 16 -> 4" in line and "train.lora.enabled false -> true" in line
    assert (out / "recipe.yaml").read_text() == saved  # not overwritten by the refused run


def test_sleep_mode_without_cuda_is_one_line_before_the_engine_starts(tmp_path):
    out = tmp_path / "run"
    line = one_line_error(rl_train(f"train.output_dir={out}", "rollout.sleep_mode=true"))
    assert "rollout.sleep_mode" in line and "CUDA" in line
    assert not out.exists()
