"""A clean console: rl-train shows its own lines, and everything else goes to the run's log file.

Real `rl-train` processes (real engine, real W&B offline, real files) with their output captured,
so not a terminal: progress comes as plain lines.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["train.steps=2", "train.eval_every=2", "train.save_every=2", "task.eval_size=8",
         "rollout.groups_per_step=2", "rollout.group_size=4", "rollout.max_tokens=24"]
# What third-party code printed on the console before the log file existed.
NOISE = ["Triton", "FutureWarning", "UserWarning", "NUMA", "Weave", "wandb:", "Writing model shards",
         "Loading weights", "Loading safetensors", "Timeout is disabled", "INFO", "WARNING", "EngineCore",
         "Traceback"]
ENGINE_LOG = re.compile(r"\(EngineCore\S* pid=\d+\)")  # a line logged by vLLM's engine process


def rl_train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}  # W&B as users get it
    return subprocess.run([sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"),
                           *args], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


def sums_dataset(path: Path) -> Path:
    """40 sums in the built-in model's format, and one row without an answer (a rollover warning)."""
    rows = [{"question": f"{a}+{a + 7}=", "answer": str(2 * a + 7)} for a in range(10, 50)]
    rows.append({"question": "1+1="})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_console_shows_rollovers_lines_and_the_log_file_the_rest(tmp_path):
    out = tmp_path / "run"
    data = sums_dataset(tmp_path / "sums.jsonl")
    result = rl_train(f"train.output_dir={out}", *SMALL, "task.name=dataset", f"task.path={data}",
                      "algo.dynamic_sampling=false", "tracking.wandb=offline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    dropped = f"warning: task.path {data}: dropped 1 of 41 rows without a question or answer"
    assert lines[0] == f"run folder: {out}"
    assert lines.count(dropped) == 1  # rollover's own warnings stay on the console, once
    assert re.fullmatch(r"eval at step 0: accuracy \d+\.\d%  reward \d\.\d\d", lines[lines.index(dropped) + 2])
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/2", "2/2"], steps
    assert all(re.fullmatch(r"step \d/2  reward \d\.\d\d  accuracy \d+%  tokens/s \d+  elapsed \d+ s  engine \d+% trainer \d+%", s)
               for s in steps), steps
    assert lines[-1].startswith("done: 2 steps in ") and lines[-1].endswith(f"summary in {out / 'summary.json'}")
    ours = ("run folder: ", dropped, "W&B offline run in ", "eval at step ", "step ", "done: ")
    assert all(line.startswith(ours) for line in lines), result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, noise

    log = (out / "rl-train.log").read_text()
    assert log.startswith("==== rl-train pid ")
    assert ENGINE_LOG.search(log)  # the engine's child processes write to the log file
    assert "Timeout is disabled" in log  # math-verify's notice, through Python logging
    assert "wandb: " in log  # W&B's own notices
    assert f"WARNING rollover.tasks.registry: task.path {data}: dropped 1 of 41 rows" in log
    # the start-up heap (torch, vLLM, the model: hundreds of thousands of objects) is frozen
    frozen = re.search(r"INFO rollover.trainer.runtime.heap: rl-train: (\d+) objects of the start-up heap frozen", log)
    assert frozen and int(frozen.group(1)) > 100_000, log[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["time/gc"] >= 0 for row in rows if "time/step" in row) and len(rows) > 2

    # An error after the heavy imports (the folder now holds a run) is still one line on stderr;
    # nothing the imports printed comes with it.
    refused = rl_train(f"train.output_dir={out}", *SMALL)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith(f"rl-train: error: train.output_dir {out} already holds a run")
    assert len(refused.stderr.splitlines()) == 1, refused.stderr


def test_verbose_shows_everything_and_still_writes_the_log_file(tmp_path):
    out = tmp_path / "run"
    result = rl_train(f"train.output_dir={out}", *SMALL, "tracking.wandb=disabled", "--verbose")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = result.stdout + result.stderr
    assert f"run folder: {out}" in shown and "step 2/2  reward" in shown and "done: 2 steps" in shown
    assert ENGINE_LOG.search(shown)
    log = (out / "rl-train.log").read_text()
    assert ENGINE_LOG.search(log)
    assert "run folder:" not in log  # the log file holds the rest, not rollover's console


CAPTURE_SCRIPT = """
import os, shutil, sys
from pathlib import Path
from rollover.trainer.runtime.console import console, error_line, finish_capture, log_to, start_capture

start_capture(verbose=False)
os.write(2, b"before the run folder is known\\n")
run = Path(sys.argv[1])
run.mkdir()
log_to(run / "rl-train.log")
os.system("echo from a child process >&2")
console.print("a rollover line")
error_line("rl-train: error: the engine failed")
shutil.rmtree(run)  # what a start that fails before training does to the folder it created
finish_capture(failed=True)
raise RuntimeError("a bug")
"""


def test_a_failed_start_keeps_its_log_and_a_bug_shows_its_traceback(tmp_path):
    """No engine: the capture alone, as the rl-train process uses it."""
    result = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT, str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[:2] == ["a rollover line", "rl-train: error: the engine failed"]
    kept = Path(re.fullmatch(r"rl-train: the run never started, so its folder was removed; its log is in (\S+)",
                             lines[2]).group(1))
    try:
        assert kept.read_text().splitlines()[1:] == [
            "before the run folder is known", "from a child process", "rl-train: error: the engine failed"]
    finally:
        kept.unlink()
    assert lines[3] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: a bug"
    assert "before the run folder" not in result.stderr and "child" not in result.stderr
