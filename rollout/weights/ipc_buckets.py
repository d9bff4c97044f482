"""CUDA-IPC weight loads in buckets: never a second full copy of the weights on the engine's GPU.

The sender runs in the process that holds the weights beside the engine: the trainer (one
in-process engine) or the engine's Ray actor (colocated engines, weights fetched from the object
store on the CPU). Either way the receiving vLLM worker is another process on the same GPU, and
vLLM's `ipc` worker engine (`IPCWeightTransferEngine`, unpacked mode) takes per-tensor CUDA-IPC
handles. Per push, on the engine's AsyncLLM:

    start_weight_update
    for each bucket (<= `bucket_bytes` of staged tensors):
        stage: copy/cast its tensors onto the GPU in the served dtype (a no-op for a tensor
               already there in that dtype)
        update_weights(names, dtype_names, shapes, one IPC handle per tensor); the call returns
               once the worker has loaded them
        free the staged tensors, `torch.cuda.ipc_collect()` (the GPU memory is reusable again)
    finish_weight_update

Buckets are cut between vLLM's layer groups (`layerwise_groups`): its layerwise reload holds a
layer's tensors until the whole layer has arrived, so a bucket that ended mid-layer would keep
that part mapped (and unfreeable) into the next bucket. A layer group larger than a bucket is
split per tensor, and a single tensor larger than a bucket travels alone: the peak extra GPU
memory is max(bucket, largest tensor), never the model.

A push that fails after `start_weight_update` still calls `finish_weight_update` (best effort):
vLLM keeps a worker whose update was started and never finished unable to load again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from rollover.rollout.weights.weight_sync import NamedTensors, WeightsUntouched

DEFAULT_BUCKET_MB = 512
MIB = 1 << 20

Share = Callable[[torch.Tensor], dict[str, tuple]]  # a GPU tensor -> {gpu uuid: rebuild args}


def staged_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is sent in: floating tensors in the served dtype, others as they are."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def staged_nbytes(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    return tensor.numel() * staged_dtype(tensor, dtype).itemsize


def plan_buckets(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int,
                 dtype: torch.dtype | None = None) -> list[list[tuple[str, torch.Tensor]]]:
    """The tensors in buckets of at most `bucket_bytes` staged bytes, cut between vLLM's layer
    groups (a group larger than a bucket is split between tensors; a tensor larger than a bucket
    is a bucket of its own). Every tensor appears exactly once."""
    from vllm.distributed.weight_transfer.base import layerwise_groups

    if bucket_bytes <= 0:
        raise ValueError(f"weight bucket size must be positive, got {bucket_bytes} bytes")
    by_name = dict(pairs)
    if len(by_name) != len(pairs):
        raise WeightsUntouched("update_weights got the same tensor name twice")
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    current: list[tuple[str, torch.Tensor]] = []
    used = 0
    for group in layerwise_groups([name for name, _ in pairs]):
        sizes = [staged_nbytes(by_name[n], dtype) for n in group]
        if current and used + sum(sizes) > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        for name, size in zip(group, sizes):
            if current and used + size > bucket_bytes:
                buckets.append(current)
                current, used = [], 0
            current.append((name, by_name[name]))
            used += size
    if current:
        buckets.append(current)
    return buckets


def cuda_ipc_share(tensor: torch.Tensor) -> dict[str, tuple]:
    """vLLM's per-tensor IPC handle: {physical GPU UUID: `reduce_tensor` rebuild args}."""
    from torch.multiprocessing.reductions import reduce_tensor

    uuid = str(torch.cuda.get_device_properties(tensor.device).uuid)
    return {uuid: reduce_tensor(tensor)[1]}


def _release_cuda_ipc() -> None:
    """Give freed, IPC-shared blocks back once the worker has dropped its mappings."""
    torch.cuda.current_stream().synchronize()
    torch.cuda.ipc_collect()


class BucketedIpcTransport:
    """`WeightTransport` over vLLM's ipc backend, one bucket of staged tensors at a time.

    `bucket_bytes`: staged bytes per bucket (rollout.weight_bucket_mb). `dtype`: the served dtype
    floating tensors are cast to while staging (None: as given). `device`: the engine's GPU (default
    the current CUDA device). `share` / `release`: the IPC export and the post-bucket cleanup
    (tests replace them on CPU).
    """

    backend = "ipc"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_MB * MIB, *, dtype: torch.dtype | str | None = None,
                 device: str | torch.device | None = None, share: Share | None = None,
                 release: Callable[[], None] | None = None) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"weight bucket size must be positive, got {bucket_bytes} bytes")
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = torch.device(device) if device is not None else None
        self.share = share or cuda_ipc_share
        self.release = release or _release_cuda_ipc
        self._llm: Any = None  # the engine whose worker engines got our init

    @property
    def casts_per_bucket(self) -> bool:
        """It casts floating tensors to the served dtype while staging: the trainer hands it its
        float32 masters as they are (`Policy.engine_weights(cast=False)`), no full cast copy."""
        return self.dtype is not None

    def _target_device(self) -> torch.device:
        if self.device is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        return self.device

    def _stage(self, bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        device = self._target_device()
        return [(name, t.detach().to(device=device, dtype=staged_dtype(t, self.dtype)).contiguous())
                for name, t in bucket]

    @staticmethod
    def _preflight() -> None:
        from vllm import envs

        if not envs.VLLM_ALLOW_INSECURE_SERIALIZATION:
            raise WeightsUntouched("ipc weight transfer needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 "
                                   "before the engine starts (CUDA-IPC handles are pickled)")

    async def _connect(self, llm: Any) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        try:
            await llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info={"packed": False}))
        except Exception as exc:  # noqa: BLE001 - init touches no weight
            raise WeightsUntouched(
                f"ipc weight transfer init failed ({type(exc).__name__}: {exc}); was the engine "
                "started with engine_args_for('ipc')?") from exc
        self._llm = llm

    async def push(self, llm: Any, named_tensors: NamedTensors) -> None:
        """Load every tensor into `llm`'s workers, bucket by bucket (see the module doc)."""
        from rollover.rollout.weights.weight_transfer import update_metadata

        pairs = [(name, tensor) for name, tensor in named_tensors]
        if not pairs:
            raise WeightsUntouched("update_weights got no tensors")
        self._preflight()
        buckets = plan_buckets(pairs, self.bucket_bytes, self.dtype)
        if llm is not self._llm:
            await self._connect(llm)
        await llm.start_weight_update()
        try:
            for bucket in buckets:
                await self._send_bucket(llm, bucket, update_metadata)
        except BaseException:
            try:
                await llm.finish_weight_update()  # else vLLM refuses every later update
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass
            raise
        await llm.finish_weight_update()

    async def _send_bucket(self, llm: Any, bucket: list[tuple[str, torch.Tensor]],
                           metadata: Callable[[NamedTensors], dict[str, list]]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        staged = self._stage(bucket)
        try:
            info = {**metadata(staged), "ipc_handles": [self.share(t) for _, t in staged]}
            if torch.cuda.is_available() and self._target_device().type == "cuda":
                torch.cuda.current_stream(self._target_device()).synchronize()  # copies landed
            await llm.update_weights(WeightTransferUpdateRequest(update_info=info))
        finally:
            del staged
            self.release()


def bucket_bytes_of(mb: float) -> int:
    """rollout.weight_bucket_mb in bytes."""
    return max(1, math.floor(mb * MIB))

