"""The engine actor's side of NCCL weight loads driven by the trainer (vLLM's design).

vLLM's `nccl` backend wants the trainer process as NCCL rank 0 broadcasting straight to the
engine's workers (ranks 1..N), with the engine's host only relaying four control calls
(vLLM 0.32 `RayVLLMWeightSyncClient`): init_weight_transfer_engine, start_weight_update,
update_weights (names, dtypes, shapes: metadata only), finish_weight_update. The trainer's
side (the sender and the client that makes those calls) is nccl_sender.py.

`WeightRelay` (inside the actor) is the engine's `WeightTransport`: `start_weight_update` runs
the engine's usual `update_weights` (admission gate closed, vLLM paused, idle check or frozen
requests, prefix-cache reset and version bump after) as a task whose push forwards the
trainer's start / update / finish to the AsyncLLM as they arrive. A refusal (busy, asleep,
broken weights) surfaces at `start_weight_update`, before any broadcast, so the trainer never
waits in NCCL for a worker that is not coming. `RelayCalls` are the actor's (`EngineHost`'s)
RPCs that feed it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rollover.rollout.weights.weight_sync import NamedTensors, WeightsUntouched


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


class RelayCalls:
    """`EngineHost`'s RPCs the trainer's sender drives (nccl_sender.py): metadata only, no tensors.
    Each refuses on an engine not started for nccl (one that loads weights itself)."""

    engine: Any  # the actor's RolloutEngine

    def _relay(self) -> WeightRelay:
        relay = self.engine.weight_transport
        if not isinstance(relay, WeightRelay):
            raise RuntimeError("this engine loads weights itself (not started for nccl weight transfer)")
        return relay

    async def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self._relay()
        await self.engine.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def shutdown_weight_transfer_engine(self) -> None:
        self._relay()
        await self.engine.llm.shutdown_weight_transfer_engine()

    async def start_weight_update(self, version: int, keep_requests: bool, recompute_kv: bool) -> None:
        await self._relay().start(self.engine, version, keep_requests, recompute_kv)

    async def update_weights_info(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        await self._relay().update(update_info)

    async def finish_weight_update(self) -> int:
        return await self._relay().finish()
