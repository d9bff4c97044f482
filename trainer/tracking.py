"""Experiment tracking: W&B (online with an API key, offline otherwise), metrics.jsonl, progress bar."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rollover.trainer.config import TrackingConfig

console = Console(stderr=True)


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
        self.run = wandb.init(project=cfg.project, name=cfg.run_name or run_name, id=run_id, resume="allow",
                              dir=str(output_dir), config=config, mode=mode)
        if mode == "offline":
            console.print(f"W&B offline run in {Path(self.run.dir).parent} — upload with: "
                          f"wandb sync {Path(self.run.dir).parent}")

    def forget_after(self, step: int) -> int:
        """Drop metrics.jsonl lines of steps after `step` (a resume retrains them); returns how many.

        Keeps one line per step whatever checkpoint a run resumes from. Rewritten atomically.
        """
        if not self.metrics_path.is_file():
            return 0
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.metrics_path)
        return len(lines) - len(kept)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")
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


def progress_bar() -> Progress:
    """Step, reward, accuracy, tokens/s and time left."""
    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("reward {task.fields[reward]:.2f} acc {task.fields[accuracy]} "
                   "{task.fields[tokens_per_s]:.0f} tok/s"),
        TimeRemainingColumn(), console=console, transient=False,
    )
