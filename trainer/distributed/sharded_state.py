"""The trainable weights and the optimizer's state as torch.distributed.checkpoint (DCP) shards.

With `train.world_size` > 1 each rank writes only its own shards into `<checkpoint>/dcp/`
(`__<rank>_0.distcp`, plus the `.metadata` rank 0 writes): no rank ever holds the whole
optimizer state. Keys are parameter names of the policy's model (`Policy.model`, the PEFT model
with LoRA), which FSDP2 leaves unchanged, so the same names come out of one process and of N
ranks, LoRA or not; frozen weights (LoRA's base) are not written, the `save_pretrained` export
beside the shards holds them. DCP reshards on load: shards written by N ranks load on M ranks,
or in one process without a process group (`no_dist`). Each rank's RNG is saved beside them.

A checkpoint whose shards do not load (a shard file missing or cut) fails in one line
(`ShardedStateError`), naming the manifest's finding when it has one; so does a failed write.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rollover.tasks.errors import RolloverError
from rollover.trainer.checkpoint import checkpoint_problem, rng_state, set_rng_state

SHARDS = "dcp"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading: the keys are get_state_dict's own (frozen ones left out), and dcp.load fails on any it
# cannot fill, so the frozen weights' absence is the only thing strict=False lets through.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class ShardedStateError(RolloverError, RuntimeError):
    """A checkpoint's DCP shards do not load: one line, the checkpoint left as it is."""


def has_sharded_state(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds DCP shards (written by N ranks) rather than one-process state."""
    return (checkpoint / SHARDS).is_dir()


def save_sharded_state(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       rank: int) -> None:
    """Write this rank's shards of `model`'s trainable weights and `optimizer`'s state, and its RNG.

    A collective over the default process group: every rank calls it with the same folder. The
    RNG goes first: DCP's closing collective then orders every rank's files before rank 0's
    return (after which rank 0 writes the manifest and renames the folder).
    """
    (checkpoint / SHARDS).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), checkpoint / SHARDS / f"rng-rank{rank}.pt")
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_OPTIONS)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint / SHARDS)
    except CheckpointException as exc:  # a rank's write failed (DCP tells every rank): one line
        raise ShardedStateError(f"writing the sharded trainer state to {checkpoint / SHARDS} failed "
                                f"({_first_line(exc)})") from None


def load_sharded_state(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       rank: int = 0, one_process: bool = False) -> None:
    """Put `checkpoint`'s shards (written by any number of ranks) into `model` and `optimizer`.

    A collective over the default process group, unless `one_process` (no process group needed).
    This rank's RNG is restored when the writing run had this rank.
    """
    if not (checkpoint / SHARDS / ".metadata").is_file():  # before DCP, which logs tracebacks for it
        raise ShardedStateError(f"checkpoint {checkpoint}: its sharded trainer state does not load "
                                f"({checkpoint_problem(checkpoint) or f'{SHARDS}/.metadata is missing'})")
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist loads in one process: we asked it to
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state, checkpoint_id=checkpoint / SHARDS, no_dist=one_process)
    except (CheckpointException, OSError) as exc:  # not a dead rank's RuntimeError: mirror.py names it
        problem = checkpoint_problem(checkpoint) or _first_line(exc)
        raise ShardedStateError(f"checkpoint {checkpoint}: its sharded trainer state does not load "
                                f"({problem})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_LOAD_OPTIONS)
    rng = checkpoint / SHARDS / f"rng-rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))


def _first_line(exc: BaseException) -> str:
    """The failure itself, not DCP's per-rank tracebacks."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))[0]
    lines = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)[:200]
