"""Atomic checkpoints: a temporary folder filled, then renamed into place.

A checkpoint holds the model in `save_pretrained` format (loadable by transformers and vLLM as
is), and `trainer_state.pt`: optimizer, scheduler, RNG states, step, policy version, the APRIL
buffer and dataset cursor, and counters. A crash mid-write leaves only a `.tmp-*` folder, which
is never read; `latest` names the newest complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, policy, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and prune all but `keep`."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        policy.save_pretrained(tmp)
        torch.save({**trainer_state, "rng": rng_state(), "step": step}, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under `output_dir`, or None."""
    root = checkpoint_dir(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # Our own file: it holds optimizer state and Python objects (buffer, RNG), so not weights_only.
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
