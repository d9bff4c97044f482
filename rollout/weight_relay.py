"""NCCL weight loads driven by the trainer, through an engine's Ray actor (vLLM's design).

vLLM's `nccl` backend wants the trainer process as NCCL rank 0 broadcasting straight to the
engine's workers (ranks 1..N), with the engine's host only relaying four control calls
(vLLM 0.32 `RayVLLMWeightSyncClient`): init_weight_transfer_engine, start_weight_update,
update_weights (names, dtypes, shapes: metadata only), finish_weight_update. Here:

- `ActorWeightSyncClient` (driver/trainer process) is vLLM's `VLLMWeightSyncClient` over one engine
  actor; `NativeWeightTransport("nccl")` (weight_transfer.py) drives vLLM's own trainer engine
  through it, so the NCCL communicator and the tensors never leave the trainer.
- `WeightRelay` (inside the actor) is the engine's `WeightTransport`: `start_weight_update` runs
  the engine's usual `update_weights` (admission gate closed, vLLM paused, idle check or frozen
  requests, prefix-cache reset and version bump after) as a task whose push forwards the
  trainer's start / update / finish to the AsyncLLM as they arrive. A refusal (busy, asleep,
  broken weights) surfaces at `start_weight_update`, before any broadcast, so the trainer never
  waits in NCCL for a worker that is not coming.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rollover.rollout.weight_sync import NamedTensors, WeightsUntouched


class WeightRelay:
    """Actor side: the engine's transport, fed by the trainer's control calls (see module doc)."""

    backend = "nccl"

    def __init__(self) -> None:
        self._inbox: asyncio.Queue | None = None
        self._started: asyncio.Future | None = None
        self._load: asyncio.Future | None = None

    # ---- the engine's WeightTransport ----------------------------------------------------------

    async def push(self, llm: Any, named_tensors: NamedTensors) -> None:
        """Forward start, each update's metadata, finish to `llm` as the trainer sends them."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        if self._inbox is None or self._started is None:
            raise WeightsUntouched("an NCCL engine loads weights only from the trainer's sender "
                                   "(start_weight_update), not from tensors")
        await llm.start_weight_update()
        self._started.set_result(None)
        while True:
            kind, payload, reply = await self._inbox.get()
            if kind == "finish":
                await llm.finish_weight_update()
                return
            try:
                await llm.update_weights(WeightTransferUpdateRequest(update_info=payload))
            except BaseException as exc:
                reply.set_exception(exc)
                raise
            reply.set_result(None)

    # ---- the actor's RPCs ----------------------------------------------------------------------

    async def start(self, engine: Any, version: int, keep_requests: bool, recompute_kv: bool) -> None:
        """Begin `engine.update_weights` with this relay as its transport; return once vLLM's
        workers have started the update, or raise the engine's refusal."""
        if self._load is not None and not self._load.done():
            raise RuntimeError("a weight update from the trainer is already open on this engine")
        loop = asyncio.get_running_loop()
        self._inbox, self._started = asyncio.Queue(), loop.create_future()
        self._load = asyncio.ensure_future(engine.update_weights(
            (), version=version, keep_requests=keep_requests, recompute_kv=recompute_kv))
        self._load.add_done_callback(_seen)
        await asyncio.wait({self._started, self._load}, return_when=asyncio.FIRST_COMPLETED)
        if not self._started.done():
            self._load.result()  # the refusal (it ended before starting)
            raise RuntimeError("the weight load ended without starting vLLM's update")

    async def update(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Forward one update's metadata; return once the workers have received the tensors."""
        reply = asyncio.get_running_loop().create_future()
        self._open_inbox().put_nowait(("update", update_info, reply))
        await asyncio.wait({reply, self._load}, return_when=asyncio.FIRST_COMPLETED)
        if reply.done():
            return reply.result()
        self._load.result()
        raise RuntimeError("the weight load ended before the update was forwarded")

    async def finish(self) -> int:
        """Finish the update; the engine's version once it serves the new weights."""
        self._open_inbox().put_nowait(("finish", None, None))
        return await self._load

    def _open_inbox(self) -> asyncio.Queue:
        if self._inbox is None or self._load is None or self._load.done():
            if self._load is not None and self._load.done():
                self._load.result()  # the failure that closed it
            raise RuntimeError("no weight update is open on this engine (start_weight_update first)")
        return self._inbox


def _seen(load: asyncio.Future) -> None:
    """A load's failure reaches the trainer through the RPC that was waiting; no second report."""
    if not load.cancelled():
        load.exception()


class ActorWeightSyncClient:
    """vLLM's `VLLMWeightSyncClient` over one engine actor (`EngineHost`'s relay RPCs).

    Called from vLLM's trainer engine in a worker thread, so each call blocks on `ray.get`.
    `order` (version, keep_requests, recompute_kv) is what the next `start_weight_update` asks
    the engine for; `served_version` is what `finish_weight_update` got back.
    `updates_sent` counts update calls issued: none means no broadcast began (NCCL intact).
    Each call waits at most `timeout_s`; `timed_out` then names it (the engine must be retired:
    its update may still be open).
    """

    def __init__(self, actor: Any, timeout_s: float | None = None) -> None:
        self.actor = actor
        self.timeout_s = timeout_s
        self.order: tuple[int, bool, bool] = (0, False, False)
        self.served_version: int | None = None
        self.updates_sent = 0
        self.timed_out: str | None = None

    def _get(self, method: Any, *args: Any) -> Any:
        import ray

        try:
            return ray.get(method.remote(*args), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            name = getattr(method, "_method_name", "a relay call")
            self.timed_out = f"{name} did not return within {self.timeout_s:g} s"
            raise

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._get(self.actor.init_weight_transfer_engine, init_info)

    def shutdown_weight_transfer_engine(self) -> None:
        self._get(self.actor.shutdown_weight_transfer_engine)

    def start_weight_update(self) -> None:
        self.updates_sent = 0
        self._get(self.actor.start_weight_update, *self.order)

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.updates_sent += 1
        self._get(self.actor.update_weights_info, update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.served_version = int(self._get(self.actor.finish_weight_update))


def trainer_sender(backend: str, dtype: str | None = None) -> Any:
    """nccl: the sender this (trainer) process runs for one engine, as NCCL rank 0 of a group of
    its own with that engine's workers (ranks 1..N), meeting at this node's address. One group
    per engine, not one over all engines: an NCCL communicator cannot lose a member, and the
    pool loses, replaces and reloads engines one at a time (a group over all would have to be
    rebuilt by every engine whenever one dies); vLLM's trainer engine also places workers at
    rank offset 1, which a shared group would have to shift per engine. The price: the trainer
    sends the weights once per engine (one send at a time), not once in all. Floating tensors go
    in the served `dtype`, cast one at a time as they are sent. None for other backends."""
    if backend != "nccl":
        return None
    import ray
    import torch

    from rollover.rollout.weight_transfer import NativeWeightTransport

    served = getattr(torch, str(dtype), None) if dtype else None
    return NativeWeightTransport("nccl", master_address=ray.util.get_node_ip_address(),
                                 dtype=served if isinstance(served, torch.dtype) else None)

