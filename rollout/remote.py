"""A `RolloutEngine` in a Ray actor, and the client handle the scheduler talks to instead.

`RemoteEngine` has the engine's interface (`Engine` in rollout/engine_api.py), so the scheduler,
the evaluator and the trainer do not know the difference. What stays on the caller's side:
- `max_model_len`, cached at start; the version the client last set (the actor follows it);
- decoding, with a tokenizer loaded locally from the same model folder (no round trip);
- the ids of the requests this client has open, so `abort` and `active_requests` need no call;
- `errored`, without blocking: set once any call finds the actor dead (`EngineLost`).

A stream is a Ray streaming generator: every chunk the engine yields reaches the caller as it
is produced, so an abort (or an actor that dies) leaves the caller every token streamed so far.
How weights travel (rollout/weights/weight_transfer.py has the details):
- shared_memory (CPU) and ipc (colocated: the engine on the trainer's GPU): one CPU copy in Ray's
  object store (put once by the pool, fetched by each actor), loaded by the actor's own transport:
  a shared-memory file, or CUDA-IPC buckets staged on the engine's GPU one at a time.
- nccl (engines on other GPUs): the trainer process is NCCL rank 0 and broadcasts straight to the
  engine's workers; `RemoteEngine` holds the trainer-side sender (nccl_sender.py: one NCCL group
  per engine, the push) and the actor only relays vLLM's control calls (init, start, update
  metadata, finish) to its engine (weight_relay.py). No tensor goes through the object store or
  the actor.

Control calls have a deadline (`settings.weight_load_timeout_s`): abort, wait-idle, sleep, the
version, the relay's calls. An actor that passes it is retired like a dead one (`EngineLost`): the
pool already replaces lost engines and moves their groups, and an engine that cannot abort or
report idle cannot be trusted to load weights either. Streams and generation have no deadline
(long by nature; the scheduler times its aborts out itself). Ray runs an async actor's calls out
of order, so the version the client last set is awaited before any later call reaches the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from rollover.rollout.cpu_executor import BIND_ENV
from rollover.rollout.engine import RolloutEngine, TokenChunk
from rollover.rollout.settings import EngineSettings, SamplingSettings
from rollover.rollout.weights.nccl_sender import NcclSending, trainer_sender
from rollover.rollout.weights.weight_relay import RelayCalls
from rollover.rollout.weights.weight_sync import NamedTensors, pairs, to_cpu_unshared
from rollover.tasks.errors import RolloverError


class EngineLost(RolloverError, RuntimeError):
    """The engine's actor died; its requests end with the tokens streamed so far."""


class EngineHost(RelayCalls):
    """Runs inside the Ray actor: one `RolloutEngine` and plain async methods over it (for nccl
    also the relay calls the trainer's sender makes: `RelayCalls`)."""

    def __init__(self, settings: EngineSettings, env: dict[str, str] | None = None,
                 backend: str = "shared_memory", slot: tuple[int, int] = (0, 1)) -> None:
        from rollover.rollout.weights.weight_transfer import engine_side_transport

        os.environ.update(env or {})
        cores = cpu_share(sorted(os.sched_getaffinity(0)), *slot)
        if cores and BIND_ENV not in os.environ:  # a CPU engine's worker
            os.environ[BIND_ENV] = ",".join(map(str, cores))
        # ipc / shared memory load what the actor holds; nccl relays the trainer's sender.
        self.engine = RolloutEngine(settings, engine_side_transport(backend, settings))
        self._version_order = 0  # the newest set_policy_version applied (`set_policy_version`)

    async def start(self) -> dict[str, Any]:
        from rollover.rollout.weights.weight_transfer import transfer_workers

        await asyncio.to_thread(self.engine.start)  # ~20 s on CPU; the actor's loop stays free
        return {"max_model_len": self.engine.max_model_len, "pid": os.getpid(),
                "transfer_workers": transfer_workers(self.engine.llm)}

    async def stream(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingSettings,
                     request_id: str) -> AsyncIterator[TokenChunk]:
        try:
            async for chunk in self.engine.stream(prompt_ids, max_tokens, sampling, request_id):
                yield chunk
        except Exception:
            if self.engine.errored:  # a dead vLLM engine: the actor goes, the pool replaces it
                os._exit(1)
            raise

    async def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingSettings,
                       request_id: str) -> TokenChunk:
        return await self.engine.generate(prompt_ids, max_tokens, sampling, request_id)

    async def abort(self, request_ids: list[str]) -> int:
        """May run before the aborted request's `stream` call reaches this actor: the engine
        remembers such ids and ends the request when it arrives."""
        return await self.engine.abort(request_ids)

    async def wait_idle(self, timeout: float, request_ids: list[str] | None) -> None:
        await self.engine.wait_idle(timeout, request_ids)

    async def update_weights(self, tensors: dict[str, Any], version: int, keep_requests: bool,
                             recompute_kv: bool) -> int:
        return await self.engine.update_weights(tensors, version=version, keep_requests=keep_requests,
                                                recompute_kv=recompute_kv)

    async def set_policy_version(self, version: int, order: int = 0) -> None:
        """Serve `version` from now on, unless a newer call (higher `order`) already ran: Ray runs
        an async actor's calls in no promised order, so two version changes sent back to back
        could otherwise land oldest last."""
        if order >= self._version_order:
            self._version_order = order
            self.engine.policy_version = version

    async def describe(self) -> dict[str, Any]:
        """What the engine itself holds (for checks; the client keeps its own copies)."""
        return {"policy_version": self.engine.policy_version, "open_requests": len(self.engine.active_requests),
                "pid": os.getpid()}

    async def weight_probe(self, token_ids: list[int]) -> list[Any]:
        """The engine's own version and probe log-probs (rollout/weights/weight_check.py)."""
        return await self.engine.weight_probe(token_ids)

    async def sleep(self, level: int) -> None:
        await self.engine.sleep(level)

    async def wake_up(self) -> None:
        await self.engine.wake_up()

    async def shutdown(self) -> None:
        self.engine.shutdown()


def cpu_share(cores: list[int], index: int, engines: int) -> list[int]:
    """The cores engine `index` of `engines` binds its CPU worker to: an even split, so engines on
    one machine do not all bind the same cores (vLLM's default for each is all cores but one);
    [] for a single engine (that default is right then). On GPU machines vLLM ignores it."""
    if engines <= 1 or not cores:
        return []
    per_engine = max(1, len(cores) // engines)
    first = (index * per_engine) % len(cores)
    return cores[first:first + per_engine]


def _lost(exc: BaseException) -> bool:
    import ray.exceptions

    return isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError)


class RemoteEngine(NcclSending):
    """The client handle of one engine actor (see the module doc); its nccl push: `NcclSending`.
    An `Engine` of rollout/engine_api.py (and a `ProbedEngine`, a `PoolMember`)."""

    def __init__(self, actor: Any, settings: EngineSettings, name: str, sender: Any = None) -> None:
        self.actor, self.settings, self.name = actor, settings, name
        self.sender = sender  # nccl: the trainer-side NativeWeightTransport (this process is rank 0)
        self._client: Any = None  # its ActorWeightSyncClient
        self.transfer_workers = 1  # the engine's vLLM workers (NCCL ranks 1..N), set at start
        self._version = 0
        self._max_model_len = settings.max_model_len
        self._active: set[str] = set()
        self._lost: str | None = None
        self._tokenizer: Any = None
        self._version_set: Any = None  # the last set_policy_version call, until it is done
        self._version_order = 0  # numbers the version changes: the actor applies the newest
        self.rpc_timeout_s = float(settings.weight_load_timeout_s)

    @classmethod
    def create(cls, settings: EngineSettings, name: str, num_cpus: float = 1.0, num_gpus: float = 0.0,
               env: dict[str, str] | None = None, backend: str = "shared_memory",
               slot: tuple[int, int] = (0, 1), **options: Any) -> "RemoteEngine":
        """A new engine actor (not started yet: `await start()`); `backend` moves its weights
        from the actor's process into its vLLM workers (see rollout/weights/weight_transfer.py);
        `slot` = (index, engines) picks its share of a CPU machine's cores (`cpu_share`)."""
        import ray

        host = ray.remote(EngineHost).options(num_cpus=num_cpus, num_gpus=num_gpus, name=name,
                                              max_concurrency=10_000, **options)
        return cls(host.remote(settings, env, backend, slot), settings, name,
                   trainer_sender(backend, settings.dtype))

    async def start(self) -> "RemoteEngine":
        info = await self._call(self.actor.start)  # no deadline: a start may take minutes
        self._max_model_len = int(info["max_model_len"])
        self.pid = int(info["pid"])
        self.transfer_workers = int(info.get("transfer_workers", 1))
        return self

    async def _call(self, method: Any, *args: Any, deadline_s: float | None = None) -> Any:
        """`method.remote(*args)` once the actor has the version last set; EngineLost if the actor
        is dead, or (the engine is retired) if the call does not return within `deadline_s`."""
        if self._lost:
            raise EngineLost(self._lost)
        await self._version_applied()

        async def call() -> Any:
            with self._deaths_as_lost():
                return await method.remote(*args)

        if deadline_s is None:
            return await call()
        return await self._within(call(), deadline_s, method)

    async def _within(self, awaitable: Any, deadline_s: float, method: Any) -> Any:
        """`awaitable` under weight_check's deadline; past it the actor is retired (EngineLost)."""
        from rollover.rollout.weights.weight_check import WeightSyncFailed, within

        what = f"engine {self.name}'s {getattr(method, '_method_name', 'call')}"
        try:
            return await within(awaitable, deadline_s, what)
        except WeightSyncFailed as exc:
            self.retire(str(exc))
            raise EngineLost(self._lost) from exc

    async def _version_applied(self) -> None:
        """Wait (under the deadline) until the actor runs the last set_policy_version call."""
        ref = self._version_set
        if ref is None:
            return

        async def applied() -> None:
            with self._deaths_as_lost():
                await ref

        await self._within(applied(), self.rpc_timeout_s, self.actor.set_policy_version)
        if self._version_set is ref:
            self._version_set = None

    @contextlib.contextmanager
    def _deaths_as_lost(self) -> Iterator[None]:
        """A dead actor's error becomes EngineLost, and the handle remembers it is dead."""
        try:
            yield
        except Exception as exc:
            if not _lost(exc):
                raise
            self.mark_lost(f"engine {self.name} died: {type(exc).__name__}")
            raise EngineLost(self._lost) from exc

    def mark_lost(self, why: str) -> None:
        self._lost = self._lost or why
        self._active.clear()

    # ---- what the scheduler reads --------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return self._version

    @policy_version.setter
    def policy_version(self, version: int) -> None:
        self._version = int(version)
        if not self._lost:  # later calls wait for it (`_version_applied`): Ray may reorder them
            self._version_order += 1
            self._version_set = self.actor.set_policy_version.remote(self._version, self._version_order)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def errored(self) -> bool:
        return self._lost is not None

    @property
    def active_requests(self) -> set[str]:
        return set(self._active)

    def router(self) -> None:
        """One engine (the pool routes over many of these): no routing."""
        return None

    def decode(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            from vllm.tokenizers import get_tokenizer

            self._tokenizer = get_tokenizer(self.settings.model)
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- requests ------------------------------------------------------------------------

    async def stream(self, prompt_ids: list[int], max_tokens: int,
                     sampling: SamplingSettings = SamplingSettings(),
                     request_id: str | None = None) -> AsyncIterator[TokenChunk]:
        """The engine's stream, chunk by chunk; EngineLost if the actor dies meanwhile."""
        rid = request_id or uuid.uuid4().hex
        if self._lost:
            raise EngineLost(self._lost)
        if rid in self._active:
            raise ValueError(f"request id {rid!r} is already running (vLLM would abort both)")
        self._active.add(rid)  # an abort from now on reaches the actor (which remembers it)
        finished, chunks = False, None
        try:
            await self._version_applied()  # the tokens are stamped with the version last set
            chunks = self.actor.stream.options(num_returns="streaming").remote(
                prompt_ids, max_tokens, sampling, rid)
            with self._deaths_as_lost():
                async for ref in chunks:
                    chunk = await ref
                    finished = chunk.finish_reason is not None
                    yield chunk
        finally:
            self._active.discard(rid)
            if chunks is not None and not finished and not self._lost:  # cancelled here: it must not run on
                self.actor.abort.remote([rid])

    async def generate(self, prompt_ids: list[int], max_tokens: int,
                       sampling: SamplingSettings = SamplingSettings(),
                       request_id: str | None = None) -> TokenChunk:
        rid = request_id or uuid.uuid4().hex
        self._active.add(rid)
        try:
            return await self._call(self.actor.generate, prompt_ids, max_tokens, sampling, rid)
        finally:
            self._active.discard(rid)

    async def abort(self, request_ids: Iterable[str]) -> int:
        ids = [r for r in request_ids if r in self._active]
        if ids and not self._lost:
            await self._call(self.actor.abort, ids, deadline_s=self.rpc_timeout_s)
        return len(ids)

    async def wait_idle(self, timeout: float = 10.0, request_ids: Iterable[str] | None = None) -> None:
        if self._lost:
            return  # a dead engine runs nothing
        ids = None if request_ids is None else list(request_ids)
        await self._call(self.actor.wait_idle, timeout, ids, deadline_s=timeout + self.rpc_timeout_s)

    # ---- weights and lifecycle -----------------------------------------------------------

    async def update_weights(self, named_tensors: NamedTensors | Any, version: int | None = None,
                             keep_requests: bool = False, recompute_kv: bool = False) -> int:
        """Load weights (named tensors, or an object-store ref of a name -> tensor dict)."""
        import ray

        target = self._version + 1 if version is None else int(version)
        if self.sender is not None:
            self._version = await self._push_from_trainer(named_tensors, target, keep_requests, recompute_kv)
            return self._version
        if not isinstance(named_tensors, ray.ObjectRef):
            named_tensors = ray.put(to_cpu_unshared(pairs(named_tensors)))
        self._version = await self._call(  # the caller's deadline (CheckedWeightSync) covers loads
            self.actor.update_weights, named_tensors, target, keep_requests, recompute_kv)
        return self._version

    def retire(self, why: str) -> None:
        """Give up on this engine (its NCCL group is unusable, or it stopped answering): kill
        its actor; the pool replaces it."""
        import ray

        self.mark_lost(why)
        if self.sender is not None:
            self.sender.close()
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - gone already
            pass

    async def weight_probe(self, token_ids: list[int]) -> list[Any]:
        """What the actor's engine serves: its own version (not this client's copy) and its
        probe log-probs (rollout/weights/weight_check.py)."""
        readings = await self._call(self.actor.weight_probe, list(token_ids))  # CheckedWeightSync's deadline
        for reading in readings:  # which actor, for the one-line error
            reading.engine = f"{self.name}: {reading.engine}"
        return readings

    async def sleep(self, level: int = 1) -> None:
        await self._call(self.actor.sleep, level, deadline_s=self.rpc_timeout_s)

    async def wake_up(self) -> None:
        await self._call(self.actor.wake_up)  # the trainer's deadline (trainer/loop.py)

    def shutdown(self) -> None:
        """Stop the engine and its actor (best effort: the actor may be gone already)."""
        import ray

        if not self._lost:
            try:
                ray.get(self.actor.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - killed below all the same
                pass
        ray.kill(self.actor, no_restart=True)
        self.mark_lost(f"engine {self.name} shut down")
        if self.sender is not None:
            self.sender.close()

