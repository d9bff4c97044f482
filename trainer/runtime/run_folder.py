"""A run folder belongs to one run: refuse one that holds another run, and lock it while training.

Without this, a second `rl-train` into the same `train.output_dir` replaced same-numbered
checkpoints, interleaved `metrics.jsonl` and overwrote `summary.json` without a word.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from rollover.tasks.errors import UsageError

LOCK_FILE = ".rl-train.lock"
RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "checkpoints", "summary.json")


class RunFolderError(UsageError):
    """The folder holds another run, or another process is using it (one line for the user)."""


def describe_run(folder: Path) -> str | None:
    """What of a run the folder holds ('3 checkpoints (last step-000040), metrics.jsonl'), or None."""
    found = []
    checkpoints = sorted(p.name for p in (folder / "checkpoints").glob("step-*") if p.is_dir())
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint{'s' * (len(checkpoints) > 1)} (last {checkpoints[-1]})")
    found += [name for name in RUN_MARKERS if name != "checkpoints" and (folder / name).exists()]
    return ", ".join(found) or None


class RunFolder:
    """Claim `folder` for this process: `claim()`, `started()` once training begins, `release()`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = None
        self._created = False
        self._started = False

    def started(self) -> None:
        """From here on the folder holds this run's data: `release` never removes it."""
        self._started = True

    def claim(self, resuming: bool) -> None:
        """Refuse a folder holding another run (unless resuming) or locked by a live process."""
        if not resuming and self.folder.is_dir():
            held = describe_run(self.folder)
            if held:
                raise RunFolderError(
                    f"train.output_dir {self.folder} already holds a run ({held}); continue it with "
                    f"train.resume=true, or start a new one in another train.output_dir")
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = open(self.folder / LOCK_FILE, "a+")
        try:
            # A POSIX record lock, not flock: a forked child (vLLM's engine process) does not
            # inherit it, so an engine orphaned by a SIGKILL cannot keep the folder locked.
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise RunFolderError(f"train.output_dir {self.folder} is in use by another rl-train "
                                 f"(pid {holder}); wait for it to finish or choose another folder") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        """Unlock; if the run never started and created the folder, remove it (no empty folders)."""
        if self._lock is not None:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
        if self._created and not self._started:
            shutil.rmtree(self.folder, ignore_errors=True)


def rewind_step_logs(folder: Path, step: int) -> dict[str, int]:
    """A resume trains the steps after its checkpoint again: every per-step log at the top of the
    run folder (`*.jsonl`, one JSON line per step with its `step`: the metrics, the trained uids,
    the swarm's audit) drops the lines of later steps, whichever part of the run writes it; step
    -1 empties them (a resume that found no checkpoint starts afresh). Returns how many lines each
    log dropped."""
    from rollover.trainer.tracking import forget_steps_after

    return {log.name: forget_steps_after(log, step) for log in sorted(folder.glob("*.jsonl"))}
