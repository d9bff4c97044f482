"""Moving trainer weights into a running vLLM engine.

The engine wrapper calls a `WeightTransport`; this file holds the one that works everywhere
(CPU build included): the trainer's tensors are written as a safetensors file in shared memory
(/dev/shm) and every vLLM worker is told, through `collective_rpc`, to load that file with the
model runner's in-place `reload_weights`. Passing tensors as `collective_rpc` arguments does not
work with AsyncLLM (they arrive as lists), and `load_weights` on the live model fails on the CPU
build, hence the file hop.

Seam for GPU transports: a NCCL-broadcast or CUDA-IPC transport implements the same
`push(llm, named_tensors)` coroutine and is passed to `RolloutEngine(weight_transport=...)`.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class WeightTransport(Protocol):
    """Loads named tensors (checkpoint names, e.g. `model.layers.0.mlp.up_proj.weight`)."""

    async def push(self, llm: Any, named_tensors: NamedTensors) -> None:
        """Load the tensors into every worker of `llm` (an idle AsyncLLM)."""


def shared_memory_dir() -> Path:
    """/dev/shm when it exists (RAM-backed), else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


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
    worker.model_runner.reload_weights(
        weights_iterator=iter(tensors.items()), is_checkpoint_format=True
    )
    return len(tensors)


class SharedMemoryTransport:
    """Write a safetensors file to shared memory, have each worker reload from it, delete it."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else shared_memory_dir()

    async def push(self, llm: Any, named_tensors: NamedTensors) -> None:
        from safetensors.torch import save_file

        tensors = to_cpu_unshared(named_tensors)
        if not tensors:
            raise ValueError("update_weights got no tensors")
        path = self.directory / f"rollover-weights-{os.getpid()}-{uuid.uuid4().hex}.safetensors"
        try:
            save_file(tensors, str(path))
            loaded = await llm.collective_rpc(_reload_from_file, args=(str(path),))
        finally:
            path.unlink(missing_ok=True)
        if not loaded or any(n != len(tensors) for n in loaded):
            raise RuntimeError(f"weight reload reported {loaded}, expected {len(tensors)} tensors")
