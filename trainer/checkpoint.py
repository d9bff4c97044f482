"""Atomic checkpoints: a temporary folder filled, then renamed into place.

A checkpoint holds the model in `save_pretrained` format (loadable by transformers and vLLM as
is): the float32 master weights themselves, whatever the compute dtype, so a resume continues
from the exact weights (LoRA: the float32 adapter, beside the merged weights in the compute
dtype; `Policy.save_pretrained`). And `trainer_state.pt`: the optimizer (AdamW's float32
moments), scheduler, RNG states, step, policy version, the APRIL buffer and dataset cursor, and
counters. With N trainer ranks the optimizer's state is not in it but in `dcp/`, each rank's
shards written by torch.distributed.checkpoint (trainer/distributed/sharded_state.py); the
manifest covers those files like any other. A crash mid-write leaves only a `.tmp-*` folder, which
is never read; `latest` names the newest complete checkpoint and moves only once it is in place.
`manifest.json`, written last, holds every file's size and SHA-256, so a checkpoint damaged after
the fact (a truncated safetensors file, a missing file) is detected and skipped on resume.

A step saved again (a resumed run re-trains the steps after its checkpoint; a stop re-saves the
step it resumed at) replaces its folder in three renames, never a delete first: the old folder is
moved aside (`.aside-*`), the new one moved in, the aside removed. A kill between the first two
leaves the step's folder missing; `recover_interrupted_save` (run before resuming) moves the
aside back. Pruned folders are renamed (`.trash-*`) before they are deleted, so a kill mid-delete
never leaves a partial `step-*` folder. Leftovers are removed by the next save.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollover.trainer.runtime.failpoints import failpoint

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
LATEST = "latest"
TMP, ASIDE, TRASH = ".tmp-", ".aside-", ".trash-"  # never match `step-*`: never read as checkpoints


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


def save_checkpoint(output_dir: Path, step: int, policy, trainer_state: dict[str, Any], keep: int,
                    write_shards: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and prune all but `keep`.

    `policy`: what exports the weights (`save_pretrained`): a `Policy` or the run's learner.
    `write_shards`: writes N trainer ranks' DCP shards into the folder (the learner's
    `save_sharded_state`; nothing for one process)."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP}{final.name}-"))
    try:
        policy.save_pretrained(tmp)
        if write_shards is not None:
            write_shards(tmp)
        torch.save({**trainer_state, "rng": rng_state(), "step": step}, tmp / STATE_FILE)
        failpoint("checkpoint_write", step)  # files written, manifest not yet: a cut checkpoint
        write_manifest(tmp)
        _move_in(tmp, final, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / LATEST, final.name)
    _remove_leftovers(root)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        _remove(old)
    return final


def _move_in(tmp: Path, final: Path, step: int) -> None:
    """Put the complete folder `tmp` at `final`; an existing `final` is moved aside first."""
    aside = final.with_name(f"{ASIDE}{final.name}")
    if final.exists():
        _remove(aside)
        os.replace(final, aside)
        failpoint("checkpoint_replace", step)  # the step's folder is missing right now
    os.replace(tmp, final)
    _remove(aside)


def _remove(folder: Path) -> None:
    """Rename, then delete: a kill mid-delete leaves a `.trash-*` folder, never a partial
    `step-*` or `.aside-*` one (so an aside is always a complete checkpoint)."""
    if not folder.exists():
        return
    trash = folder.with_name(f"{TRASH}{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Folders of interrupted saves and deletes (this process holds the run folder's lock)."""
    for leftover in list(root.glob(".*")):
        if leftover.is_dir() and leftover.name.startswith((TMP, TRASH, ASIDE)):
            if not leftover.name.startswith(ASIDE):
                shutil.rmtree(leftover, ignore_errors=True)
            elif (root / leftover.name[len(ASIDE):]).is_dir():  # else the only copy of its step,
                _remove(leftover)  # which recover_interrupted_save moves back


def recover_interrupted_save(output_dir: Path) -> list[Path]:
    """Move back steps a kill left aside mid-replace (see the module doc); returns them."""
    root = checkpoint_dir(output_dir)
    recovered = []
    for aside in sorted(root.glob(f"{ASIDE}step-*")):
        final = root / aside.name[len(ASIDE):]
        if aside.is_dir() and not final.exists():
            os.replace(aside, final)
            recovered.append(final)
    return recovered


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Size and SHA-256 of every file in the checkpoint folder, written last."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is.

    Checkpoints from before manifests existed are accepted on their trainer state alone.
    """
    if not (folder / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {entry['size']}"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under `output_dir`, or None (see `find_checkpoint`)."""
    return find_checkpoint(output_dir)[0]


def find_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, the newer ones skipped with their problem).

    `latest` is tried first, then every `step-*` folder from the newest down.
    """
    root = checkpoint_dir(output_dir)
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    pointer = root / LATEST
    if pointer.is_file() and (root / pointer.read_text().strip()) in candidates:
        named = root / pointer.read_text().strip()
        candidates.remove(named)
        candidates.insert(0, named)
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, skipped
        skipped.append((candidate, problem))
    return None, skipped


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # Our own file: it holds optimizer state and Python objects (buffer, RNG), so not weights_only.
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
