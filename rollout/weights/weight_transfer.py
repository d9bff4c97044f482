"""Trainer weights into vLLM through vLLM's own weight-transfer API (GPU builds).

How weights travel, per `cluster.weight_transfer` (chosen by rollout/cluster.py):

* shared_memory (CPU, any build): `SharedMemoryTransport` (weight_sync.py) in the engine's process.
  Under Ray the pool puts one CPU copy in the object store and each engine actor fetches it.
* ipc (an engine on the trainer's GPU): `BucketedIpcTransport` (ipc_buckets.py) in the process
  that holds the weights beside the engine: the trainer for the in-process engine, the engine's
  actor for colocated Ray engines (weights from the object store). A bucket of tensors at a time
  is staged on the GPU in the served dtype, its CUDA-IPC handles are loaded by the worker, then
  freed: never a second full copy on the GPU. Handles cross the AsyncLLM msgpack hop only with
  VLLM_ALLOW_INSECURE_SERIALIZATION=1 set before the engine starts (RolloutEngine.start sets it).
* nccl (engines on other GPUs/machines): `NativeWeightTransport` below, in the TRAINER process,
  which is NCCL rank 0 hosting the TCPStore at master_address:master_port; the engine's workers are
  ranks 1..N (world_size = 1 + TP*PP*DP), one group per engine. It runs vLLM's own trainer engine
  (`WeightTransferTrainerFactory.trainer_init` once, then `send_weights()` per push), which calls,
  through a `VLLMWeightSyncClient`: init_weight_transfer_engine (once), then per push
  start_weight_update -> update_weights (names, dtype_names, shapes; plain msgpack; concurrent
  with the broadcast) -> finish_weight_update. The client is `_LoopClient` for an in-process
  AsyncLLM, or `ActorWeightSyncClient` (nccl_sender.py) for a Ray engine, whose actor only relays
  those calls: no tensor enters the actor or the object store. Packed (vLLM's default) stages
  through 2 x 1 GiB buffers on both sides. A push that fails after its broadcast began leaves the
  group unusable: that engine is refused until restarted (a Ray engine is replaced by its pool).
Packed mode needs each tensor aligned to its itemsize inside the buffer: see `packing_order`.

Workers: start/finish open and close a layerwise reload, update runs `model.load_weights`, finish
also drops all loaded LoRA adapters. A LoRA trainer sends merged weights.

Versions: `finish_weight_update(v)` is finish plus a separate `update_weight_version(v)`; vLLM's
senders pass none, and EngineControl sets the label itself while paused, so none is set here.

A shared-memory vLLM backend (`WeightTransferEngineFactory.register_engine`) is feasible (CPUWorker
inherits `Worker.load_model`) but not done: the registry is per process and read in the worker, so
it needs a `vllm.general_plugins` entry point (registering here is lost when workers spawn); the
base `update_weights` calls `torch.accelerator.synchronize()`, which raises on CPU; and it would
redo SharedMemoryTransport (file + layerwise reload). Its one gain: the RPC would carry a path,
not a pickled function, so no VLLM_ALLOW_INSECURE_SERIALIZATION.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Coroutine
from typing import Any, Literal, get_args

import torch

from rollover.rollout.weights.weight_sync import (NamedTensors, SharedMemoryTransport,
                                                  WeightsUntouched, WeightTransport)

WeightBackend = Literal["shared_memory", "ipc", "nccl"]  # cluster.weight_transfer (or auto)
BACKENDS: tuple[str, ...] = get_args(WeightBackend)
NATIVE_BACKENDS = ("nccl",)  # NativeWeightTransport; ipc is BucketedIpcTransport (ipc_buckets.py)

# NCCL sends from this process run one at a time: one group per engine shares the trainer's GPU,
# and concurrent collectives on several communicators of one device can deadlock.
_NCCL_SENDS = threading.Lock()


def _check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> None:
    if backend not in allowed:
        raise ValueError(f"unknown weight transfer backend {backend!r}; valid: {', '.join(allowed)}")


def engine_args_for(backend: str) -> dict[str, Any]:
    """Extra AsyncEngineArgs kwargs the engine needs for `backend` (none for shared_memory)."""
    _check_backend(backend)
    if backend == "shared_memory":
        return {}
    from vllm.config import WeightTransferConfig  # vllm/config/weight_transfer.py

    return {"weight_transfer_config": WeightTransferConfig(backend=backend)}


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype string vLLM's workers turn back into a dtype with `getattr(torch, name)`."""
    name = str(dtype).removeprefix("torch.")
    if getattr(torch, name, None) is not dtype:
        raise ValueError(f"dtype {dtype} has no torch.<name> attribute for vLLM to parse")
    return name


def update_metadata(named_tensors: NamedTensors) -> dict[str, list]:
    """Per-update fields vLLM's workers parse (`NCCLWeightTransferUpdateInfo`, and
    `IPCWeightTransferUpdateInfo` without its handles): names, dtype names, shapes as int lists."""
    pairs = list(named_tensors)
    return {"names": [name for name, _ in pairs],
            "dtype_names": [dtype_name(t.dtype) for _, t in pairs],
            "shapes": [[int(d) for d in t.shape] for _, t in pairs]}


def packing_order(pairs: list[tuple[str, torch.Tensor]],
                  dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    """Widest dtype first (stable): vLLM's `unpack_tensor` views each byte slice as its dtype, which
    fails unless the offset is a multiple of the itemsize (fp32 after a 7-element bf16). Sorted,
    every offset in a chunk is a sum of sizes that are multiples of the current itemsize."""
    from rollover.rollout.weights.ipc_buckets import staged_dtype

    return sorted(pairs, key=lambda pair: -staged_dtype(pair[1], dtype).itemsize)


@functools.cache
def _tensor_source_cls() -> type:
    """A vLLM `WeightSource` whose tensors are replaced before each `send_weights()`."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    from rollover.rollout.weights.ipc_buckets import staged_dtype

    class TensorSource(WeightSource):
        def __init__(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
            self.device, self.dtype = device, dtype
            self.tensors: list[tuple[str, torch.Tensor]] = []

        def metadata(self) -> list[ParamMeta]:  # NCCL sizes the workers' buffers from this
            return [ParamMeta(n, staged_dtype(t, self.dtype), tuple(t.shape)) for n, t in self.tensors]

        def __iter__(self):
            for name, tensor in self.tensors:  # one cast at a time; a no-op when already there
                yield name, tensor.to(device=self.device, dtype=staged_dtype(tensor, self.dtype))

    return TensorSource


class _LoopClient:
    """vLLM's synchronous `VLLMWeightSyncClient` (base.py) over an AsyncLLM running on `loop`:
    vLLM's trainer engines call it from a thread, each call runs on the loop and is waited for."""

    def __init__(self, llm: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.llm, self.loop, self.loop_thread = llm, loop, threading.get_ident()
        self.updates_sent = 0  # update calls this push (none: no broadcast began)

    def _wait(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if threading.get_ident() == self.loop_thread:
            coro.close()
            raise RuntimeError("weight-sync client called on the event loop thread (deadlock)")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self._wait(self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info)))

    def start_weight_update(self) -> None:
        self.updates_sent = 0
        self._wait(self.llm.start_weight_update())

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self.updates_sent += 1
        self._wait(self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info)))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._wait(self.llm.finish_weight_update(weight_version))


class NativeWeightTransport:
    """`WeightTransport` over vLLM's nccl transfer, run where the trainer's weights are (rank 0);
    connects on the first push to an engine.

    The engine `push` gets is an in-process AsyncLLM, or anything with `weight_sync_client()`
    (a `VLLMWeightSyncClient`), `transfer_workers` and `shutdown_weight_transfer_engine()` — a
    Ray engine's `RemoteEngine`. `device`: the sending GPU (default: the first CUDA tensor's, else
    the current one); tensors elsewhere are copied there one at a time. `packed*`: vLLM's defaults
    unless given. nccl meets at `master_address`:`master_port` (default a free port), `world_size`
    default 1 + the engine's workers. `dtype`: the served dtype floating tensors are cast to, one
    tensor at a time as they are sent (None: as given).
    """

    def __init__(self, backend: str, *, device: str | torch.device | None = None,
                 packed: bool | None = None, packed_buffer_size_bytes: int | None = None,
                 packed_num_buffers: int | None = None, master_address: str = "127.0.0.1",
                 master_port: int | None = None, world_size: int | None = None,
                 dtype: torch.dtype | str | None = None) -> None:
        if backend == "ipc":
            raise ValueError("ipc weight transfer is BucketedIpcTransport (rollout/weights/ipc_buckets.py)")
        _check_backend(backend, NATIVE_BACKENDS)
        self.backend = backend
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = torch.device(device) if device is not None else None
        wire = dict(packed=packed, packed_buffer_size_bytes=packed_buffer_size_bytes,
                    packed_num_buffers=packed_num_buffers)
        self.wire = {k: v for k, v in wire.items() if v is not None}  # vLLM's defaults for the rest
        self.packed = True if packed is None else packed  # vLLM's default
        self.master_address, self.master_port, self.world_size = master_address, master_port, world_size
        self._trainer: Any = None  # vLLM's trainer engine, connected to self._llm
        self._source: Any = None
        self._llm: Any = None
        self._dead_llm: Any = None  # an engine whose NCCL group broke mid-push
        self._client: Any = None  # the VLLMWeightSyncClient of self._llm

    def trainer_init_info(self, llm: Any) -> Any:
        """vLLM's `NCCLTrainerInitInfo` for `llm`: this process is rank 0, its workers 1..N."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
        from vllm.utils.network_utils import get_open_port

        world = self.world_size or 1 + transfer_workers(llm)
        return NCCLTrainerInitInfo(rank=0, master_address=self.master_address,
                                   master_port=self.master_port or get_open_port(),
                                   world_size=world, **self.wire)

    def _on_device(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn` with the sending GPU current (a fresh thread starts on GPU 0), one NCCL
        send of this process at a time."""
        on_gpu = self.device is not None and self.device.type == "cuda"
        with _NCCL_SENDS, torch.cuda.device(self.device) if on_gpu else contextlib.nullcontext():
            return fn(*args, **kwargs)

    def _preflight(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """Everything that can be refused before any weight changes, as WeightsUntouched."""
        if not pairs:
            raise WeightsUntouched("update_weights got no tensors")
        try:
            update_metadata(pairs)
        except ValueError as exc:
            raise WeightsUntouched(str(exc)) from exc

    async def _connect(self, llm: Any, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """vLLM's trainer_init against `llm` (nccl: the rendezvous); failures touch no weight."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        self.close()
        if self.device is None:
            self.device = next((t.device for _, t in pairs if t.is_cuda), None)
            if self.device is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        source = _tensor_source_cls()(self.device, self.dtype)
        make_client = getattr(llm, "weight_sync_client", None)
        client = make_client() if make_client else _LoopClient(llm, asyncio.get_running_loop())
        try:
            await llm.shutdown_weight_transfer_engine()  # drop a previous trainer connection
            trainer = await asyncio.to_thread(
                self._on_device, WeightTransferTrainerFactory.trainer_init,  # factory.py
                self.trainer_init_info(llm), client=client, source=source)
        except Exception as exc:  # noqa: BLE001 - init touches no weight
            raise WeightsUntouched(
                f"{self.backend} weight transfer init failed ({type(exc).__name__}: {exc}); "
                f"was the engine started with engine_args_for({self.backend!r})?") from exc
        self._trainer, self._source, self._llm, self._client = trainer, source, llm, client

    async def push(self, llm: Any, named_tensors: NamedTensors) -> None:
        """Send every tensor through vLLM's trainer engine (`send_weights`: start, update, finish)."""
        if llm is self._dead_llm:
            raise WeightsUntouched("the NCCL weight-transfer group of this engine broke in an earlier "
                                   "push; restart the engine")
        pairs = [(name, tensor.detach()) for name, tensor in named_tensors]
        self._preflight(pairs)
        if self._trainer is None or llm is not self._llm:
            await self._connect(llm, pairs)
        self._source.tensors = packing_order(pairs, self.dtype) if self.packed else pairs
        try:
            await asyncio.to_thread(self._on_device, self._trainer.send_weights)  # ipc/nccl_engine.py
        except BaseException as exc:
            if getattr(self._client, "updates_sent", 1):  # vLLM: after a failed send the group
                self._dead_llm = llm                       # is unusable (a refused start is not)
                if not isinstance(exc, asyncio.CancelledError):  # else the thread still sends
                    self.close()
            raise
        finally:
            if self._source is not None:
                self._source.tensors = []

    def close(self) -> None:
        """Tear down the trainer side (the NCCL communicator); the next push connects again."""
        if self._trainer is not None:
            self._trainer.shutdown()
        self._trainer = self._source = self._llm = self._client = None


def transfer_workers(llm: Any) -> int:
    """The vLLM workers of an engine (TP x PP x DP): its ranks 1..N in an NCCL group."""
    workers = getattr(llm, "transfer_workers", None)
    if workers is not None:
        return int(workers)
    return int(llm.vllm_config.parallel_config.world_size_across_dp)


def weight_transport_for(backend: str, **options: Any) -> WeightTransport:
    """The transport for `backend` in the process that holds the weights beside the engine:
    shared_memory (CPU, any build), ipc (bucketed, `BucketedIpcTransport` options) or nccl."""
    _check_backend(backend)
    if backend == "shared_memory":
        return SharedMemoryTransport(**options)
    if backend == "ipc":
        from rollover.rollout.weights.ipc_buckets import BucketedIpcTransport

        return BucketedIpcTransport(**options)
    return NativeWeightTransport(backend, **options)


def engine_side_transport(backend: str, settings: Any) -> WeightTransport:
    """The transport of the process that hosts an engine (the trainer for the in-process engine,
    the actor for a Ray engine): shared memory or bucketed ipc load tensors it holds; for nccl it
    holds none, and relays the trainer's sender (weight_relay.py)."""
    _check_backend(backend)
    if backend == "nccl":
        from rollover.rollout.weights.weight_relay import WeightRelay

        return WeightRelay()
    if backend == "ipc":
        from rollover.rollout.weights.ipc_buckets import bucket_bytes_of

        dtype = getattr(torch, str(settings.dtype), None)
        return weight_transport_for("ipc", bucket_bytes=bucket_bytes_of(settings.weight_bucket_mb),
                                    dtype=dtype if isinstance(dtype, torch.dtype) else None)
    return weight_transport_for(backend)
