"""The trainer side of NCCL weight loads into Ray engine actors (the actor side: weight_relay.py).

vLLM's `nccl` backend wants the trainer process as NCCL rank 0 broadcasting straight to an
engine's workers (ranks 1..N); the engine's host only relays four control calls (vLLM 0.32
`RayVLLMWeightSyncClient`): init_weight_transfer_engine, start_weight_update, update_weights
(names, dtypes, shapes: metadata only), finish_weight_update. Here, all in the driver/trainer process:

- `trainer_sender` builds the sender for one engine: a `NativeWeightTransport("nccl")`
  (weight_transfer.py) that drives vLLM's own trainer engine, so the NCCL communicator and the
  tensors never leave the trainer (nothing goes through the object store or the actor).
- `ActorWeightSyncClient` is vLLM's `VLLMWeightSyncClient` over one engine actor (`EngineHost`'s
  relay RPCs), each call under a deadline.
- `NcclSending` is the part of `RemoteEngine` (remote.py) that pushes through them: a push that
  fails after its broadcast began, or whose relay call passes its deadline, retires the engine
  (its actor is killed; the pool replaces it), since its NCCL group or update may be left open.
"""

from __future__ import annotations

from typing import Any

from rollover.rollout.weights.weight_sync import WeightsUntouched, pairs


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

    from rollover.rollout.weights.weight_transfer import NativeWeightTransport

    served = getattr(torch, str(dtype), None) if dtype else None
    return NativeWeightTransport("nccl", master_address=ray.util.get_node_ip_address(),
                                 dtype=served if isinstance(served, torch.dtype) else None)


class NcclSending:
    """`RemoteEngine`'s trainer side of nccl loads: this process sends, the actor relays.

    Also what the sender expects of the engine it pushes to (`weight_sync_client`,
    `transfer_workers`, `shutdown_weight_transfer_engine`). Uses the handle's actor, deadline,
    liveness and `retire` (remote.py)."""

    actor: Any
    name: str
    sender: Any  # the trainer-side NativeWeightTransport (`trainer_sender`); None: not nccl
    rpc_timeout_s: float
    _client: ActorWeightSyncClient | None
    _lost: str | None

    @property
    def takes_local_tensors(self) -> bool:
        """nccl: give `update_weights` the trainer's tensors as they are (no CPU copy, no object store)."""
        return self.sender is not None

    def weight_sync_client(self) -> ActorWeightSyncClient:
        """vLLM's `VLLMWeightSyncClient` over this engine's actor (for the trainer-side sender)."""
        if self._client is None:
            self._client = ActorWeightSyncClient(self.actor, self.rpc_timeout_s)
        return self._client

    async def shutdown_weight_transfer_engine(self) -> None:
        await self._call(self.actor.shutdown_weight_transfer_engine, deadline_s=self.rpc_timeout_s)

    async def _push_from_trainer(self, named_tensors: Any, target: int, keep_requests: bool,
                                 recompute_kv: bool) -> int:
        """Broadcast from this process to the engine's workers; the actor relays the control
        calls. A failure after the broadcast began retires the engine (EngineLost)."""
        from rollover.rollout.remote import EngineLost

        if self._lost:
            raise EngineLost(self._lost)
        client = self.weight_sync_client()
        client.order = (target, keep_requests, recompute_kv)
        client.served_version, client.timed_out = None, None
        try:
            with self._deaths_as_lost():
                await self.sender.push(self, pairs(named_tensors))
        except Exception as exc:
            if client.timed_out:  # a relay call passed its deadline: the update may be open
                self.retire(f"engine {self.name}: {client.timed_out} (rollout.weight_load_timeout_s)")
                raise EngineLost(self._lost) from exc
            if isinstance(exc, WeightsUntouched | EngineLost) or not client.updates_sent:
                raise  # refused before any broadcast: the group is intact
            self.retire(f"engine {self.name}: the NCCL weight push failed ({type(exc).__name__}: {exc})")
            raise EngineLost(self._lost) from exc
        if client.served_version is None:
            raise RuntimeError(f"engine {self.name} finished a weight update without a version")
        return client.served_version
