"""Experiment tracking: W&B (online with an API key, offline otherwise), metrics.jsonl, progress.

Progress is a rich bar in a terminal and a plain line every few steps elsewhere (CI, nohup,
SLURM logs), where a bar would show nothing until the end.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rollover.trainer.config import TrackingConfig
from rollover.trainer.runtime.console import console

EVAL_PREFIXES = {"eval": "eval", "resume_eval": "resume check eval"}


def has_wandb_key() -> bool:
    """An API key is configured: WANDB_API_KEY, or `wandb login`'s entry in the netrc file."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_mode(setting: str) -> str:
    """`auto` means online when an API key is configured (env or netrc), else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_key() else "offline"


class Tracker:
    """Logs each step to `metrics.jsonl` in the run folder and to W&B."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, config: dict[str, Any], run_name: str):
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.run = None
        mode = wandb_mode(cfg.wandb)
        if mode == "disabled":
            return
        import wandb

        id_file = output_dir / "wandb_id"  # the same W&B run continues after a resume
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        swarm = config.get("swarm", {})
        # A swarm's nodes share one W&B group (the swarm's name): one view compares them all.
        group = f"swarm-{swarm['name']}" if swarm.get("enabled") else None
        self.run = wandb.init(project=cfg.project, name=cfg.run_name or run_name, id=run_id, resume="allow",
                              dir=str(output_dir), config=config, mode=mode, group=group,
                              # rollover's console is not W&B's to copy; its own notices go to rl-train.log
                              settings=wandb.Settings(console="off"))
        if mode == "offline":
            console.print(f"W&B offline run in {Path(self.run.dir).parent} — upload with: "
                          f"wandb sync {Path(self.run.dir).parent}")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")
        for prefix, name in EVAL_PREFIXES.items():
            if f"{prefix}/accuracy" in metrics:
                console.print(eval_line(name, step, metrics[f"{prefix}/accuracy"], metrics[f"{prefix}/reward"]),
                              markup=False, highlight=False)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[tuple[str, str, float]]) -> None:
        """A W&B table of sample completions (prompt, completion, reward)."""
        if self.run is None or not samples:
            return
        import wandb

        table = wandb.Table(columns=["step", "prompt", "completion", "reward"],
                            data=[[step, p, c, r] for p, c, r in samples])
        self.run.log({"completions": table}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish()


def forget_steps_after(path: Path, step: int) -> int:
    """Drop the lines of a per-step JSONL file whose step is after `step`; returns how many.

    A resume trains the steps after its checkpoint again: trimming their old lines keeps one line
    per step. A line cut by a crash (not JSON) is dropped too. Rewritten atomically.
    """
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def format_duration(seconds: float) -> str:
    """41 s, 12 min 05 s, 2 h 03 min."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def step_line(step: int, total: int, reward: float, accuracy: str, tokens_per_s: float, elapsed: float,
              busy: str = "") -> str:
    """The plain progress line: `step 20/300  reward 0.41  accuracy 52%  tokens/s 812  elapsed 41 s`,
    then `busy` (where the time went: `engine 85% trainer 97%`) when given."""
    return (f"step {step}/{total}  reward {reward:.2f}  accuracy {accuracy}  "
            f"tokens/s {tokens_per_s:.0f}  elapsed {format_duration(elapsed)}" + (f"  {busy}" if busy else ""))


def busy_text(engine_busy: float, trainer_busy: float) -> str:
    """How busy the engine and the trainer were over the last step (the pipeline's effect)."""
    return f"engine {engine_busy:.0%} trainer {trainer_busy:.0%}"


def eval_line(name: str, step: int, accuracy: float, reward: float) -> str:
    """`eval at step 20: accuracy 52.3%  reward 0.52`."""
    return f"{name} at step {step}: accuracy {accuracy:.1%}  reward {reward:.2f}"


def line_every(steps: int) -> int:
    """Steps between plain lines: a round number (1, 2, 5, 10, 20, 50, ...) giving at most ~30 lines."""
    round_numbers = (m * 10**k for k in itertools.count() for m in (1, 2, 5))
    return next(every for every in round_numbers if every * 30 >= steps)


class PlainProgress:
    """The progress bar where the console is not a terminal: one line every few steps.

    Takes the calls `train()` makes on rich's Progress (a context manager, `add_task`, `update`).
    A line also comes after `max_quiet_s` without one, so slow steps still show life.
    """

    def __init__(self, out: Console, max_quiet_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.max_quiet_s, self.clock = out, max_quiet_s, clock
        self.total, self.completed, self.every = 0, 0, 1
        self.fields: dict[str, Any] = {}
        self.started = self.last_line = clock()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, **fields: Any) -> int:
        self.total, self.completed, self.fields = total, completed, dict(fields)
        self.every = line_every(total)
        self.started = self.last_line = self.clock()
        return 0

    def update(self, task_id: int, completed: int | None = None, **fields: Any) -> None:
        self.fields.update(fields)
        if completed is None or completed == self.completed:
            return
        self.completed = completed
        now = self.clock()
        if completed % self.every and completed < self.total and now - self.last_line < self.max_quiet_s:
            return
        self.last_line = now
        f = self.fields
        self.out.print(step_line(completed, self.total, f.get("reward", 0.0), f.get("accuracy", "-"),
                                 f.get("tokens_per_s", 0.0), now - self.started, f.get("busy", "")),
                       markup=False, highlight=False)


def progress_bar() -> Progress | PlainProgress:
    """Step, reward, accuracy, tokens/s and time left: a rich bar in a terminal, else plain lines."""
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("reward {task.fields[reward]:.2f} acc {task.fields[accuracy]} "
                   "{task.fields[tokens_per_s]:.0f} tok/s {task.fields[busy]}"),
        TimeRemainingColumn(), console=console, transient=False,
        # Python-level writes to sys.stdout/stderr are third-party output for the log file, not
        # lines to print above the bar (rich's default).
        redirect_stdout=False, redirect_stderr=False,
    )
