"""`trained_uids.jsonl` in the run folder: the prompt uids each step trained on, one line per step.

With the checkpoint's ledger it proves conservation across kills and resumes: every drawn uid
was trained exactly once (it is in exactly one line), is buffered, or was dropped with a reason.
A resume re-trains the steps after its checkpoint, so it first drops their lines
(`run_folder.rewind_step_logs`, as for every per-step log): the log keeps one line per step.
"""

from __future__ import annotations

import json
from pathlib import Path

UID_LOG = "trained_uids.jsonl"


def log_trained(output_dir: Path, step: int, uids: list[int]) -> None:
    """Append step `step`'s trained uids (one small write: a kill cannot leave half a line)."""
    with (output_dir / UID_LOG).open("a") as out:
        out.write(json.dumps({"step": step, "uids": uids}) + "\n")


def _entries(path: Path) -> list[dict]:
    """The log's entries; a line cut by a crash (not JSON) is skipped."""
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def read_trained(output_dir: Path) -> list[tuple[int, list[int]]]:
    """(step, uids) per line, in file order."""
    path = output_dir / UID_LOG
    return [(e["step"], e["uids"]) for e in _entries(path)] if path.is_file() else []
