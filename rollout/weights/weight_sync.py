"""Moving trainer weights into a running vLLM engine.

The engine wrapper calls a `WeightTransport`; this file holds the one that works everywhere
(CPU build included): the trainer's tensors are written as a safetensors file in shared memory
(/dev/shm) and every vLLM worker is told, through `collective_rpc`, to load that file with the
worker's in-place `reload_weights` (the worker's, not the model runner's: it sets the vLLM config
context that some layers and fp8 need). Passing tensors as `collective_rpc` arguments does not
work with AsyncLLM (they arrive as lists), and `load_weights` on the live model fails on the CPU
build, hence the file hop. /dev/shm is small in Docker (64 MiB by default): when the weights do
not fit, the file goes to the temp dir instead, or the load fails in one line before any weight
is touched.

Seam for GPU transports: a NCCL-broadcast or CUDA-IPC transport implements the same
`push(llm, named_tensors)` coroutine and is passed to `RolloutEngine(weight_transport=...)`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class WeightsUntouched(RuntimeError):
    """A weight load failed before any weight changed (the engine still serves the old ones)."""


class WeightTransport(Protocol):
    """Loads named tensors (checkpoint names, e.g. `model.layers.0.mlp.up_proj.weight`)."""

    async def push(self, llm: Any, named_tensors: NamedTensors) -> None:
        """Load the tensors into every worker of `llm` (an idle AsyncLLM)."""


def shared_memory_dir() -> Path:
    """/dev/shm when it exists (RAM-backed), else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


# Room left beside the file: safetensors' header, and other users of the same directory.
SPACE_MARGIN = 1.05
SPACE_SLACK_BYTES = 1 << 20


def pick_weights_dir(nbytes: int, candidates: list[Path]) -> Path:
    """The first writable directory with room for a `nbytes` weights file; WeightsUntouched if none."""
    need = int(nbytes * SPACE_MARGIN) + SPACE_SLACK_BYTES
    seen = []
    for directory in candidates:
        if not (directory.is_dir() and os.access(directory, os.W_OK)):
            continue
        free = shutil.disk_usage(directory).free
        if free >= need:
            return directory
        seen.append(f"{directory} has {free / 2**20:.0f} MiB free")
    raise WeightsUntouched(
        f"no room for the {need / 2**20:.0f} MiB weights file ({'; '.join(seen) or 'no writable dir'}): "
        f"enlarge /dev/shm (docker run --shm-size=...) or set TMPDIR to a larger disk"
    )


def pairs(named_tensors: NamedTensors | dict[str, torch.Tensor]) -> NamedTensors:
    """(name, tensor) pairs from either pairs or a name -> tensor dict."""
    return named_tensors.items() if hasattr(named_tensors, "items") else named_tensors


def to_cpu_unshared(named_tensors: NamedTensors) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors sharing storage (tied embeddings) get their own copy.

    safetensors refuses to save tensors that share memory, which tied weights do.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _reload_from_file(worker: Any, path: str) -> int:
    """Runs inside each vLLM worker (sent by reference through collective_rpc)."""
    from safetensors.torch import load_file

    tensors = load_file(path, device="cpu")
    worker.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
    return len(tensors)


class SharedMemoryTransport:
    """Write a safetensors file to shared memory, have each worker reload from it, delete it.

    `directory` forces one place; by default /dev/shm, falling back to the temp dir when the
    weights do not fit there.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None

    def candidates(self) -> list[Path]:
        if self.directory is not None:
            return [self.directory]
        return list(dict.fromkeys([shared_memory_dir(), Path(tempfile.gettempdir())]))

    async def push(self, llm: Any, named_tensors: NamedTensors) -> None:
        from safetensors.torch import save_file

        tensors = to_cpu_unshared(named_tensors)
        if not tensors:
            raise WeightsUntouched("update_weights got no tensors")
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        directory = pick_weights_dir(nbytes, self.candidates())
        path = directory / f"rollover-weights-{os.getpid()}-{uuid.uuid4().hex}.safetensors"
        try:
            try:
                save_file(tensors, str(path))
            except OSError as exc:  # e.g. the directory filled up meanwhile
                raise WeightsUntouched(f"writing the weights file {path} failed: {exc}") from exc
            loaded = await llm.collective_rpc(_reload_from_file, args=(str(path),))
        finally:
            path.unlink(missing_ok=True)
        if not loaded or any(n != len(tensors) for n in loaded):
            raise RuntimeError(f"weight reload reported {loaded}, expected {len(tensors)} tensors")
