"""A `RolloutEngine` in a Ray actor, and the client handle the scheduler talks to instead.

`RemoteEngine` has the engine's interface (`stream`, `generate`, `abort`, `wait_idle`,
`update_weights`, `policy_version`, `max_model_len`, `decode`, `errored`), so the scheduler,
the evaluator and the trainer do not know the difference. What stays on the caller's side:
- `max_model_len`, cached at start; the version the client last set (the actor follows it);
- decoding, with a tokenizer loaded locally from the same model folder (no round trip);
- the ids of the requests this client has open, so `abort` and `active_requests` need no call;
- `errored`, without blocking: set once any call finds the actor dead (`EngineLost`).

A stream is a Ray streaming generator: every chunk the engine yields reaches the caller as it
is produced, so an abort (or an actor that dies) leaves the caller every token streamed so far.
Weights travel as one object in Ray's object store (put once by the pool, fetched by each
actor), then go into the actor's engine through the engine's own transport (shared memory on
the actor's machine), so CPU engines on other machines get them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from rollover.rollout.engine import RolloutEngine, TokenChunk
from rollover.rollout.settings import EngineSettings, SamplingSettings
from rollover.rollout.weight_sync import NamedTensors, pairs, to_cpu_unshared


class EngineLost(RuntimeError):
    """The engine's actor died; its requests end with the tokens streamed so far."""


class EngineHost:
    """Runs inside the Ray actor: one `RolloutEngine` and plain async methods over it."""

    def __init__(self, settings: EngineSettings, env: dict[str, str] | None = None,
                 backend: str = "shared_memory", slot: tuple[int, int] = (0, 1)) -> None:
        from rollover.rollout.weight_transfer import weight_transport_for

        os.environ.update(env or {})
        cores = cpu_share(sorted(os.sched_getaffinity(0)), *slot)
        if cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # a CPU engine's worker
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        self.engine = RolloutEngine(settings, weight_transport_for(backend))

    async def start(self) -> dict[str, Any]:
        await asyncio.to_thread(self.engine.start)  # ~20 s on CPU; the actor's loop stays free
        return {"max_model_len": self.engine.max_model_len, "pid": os.getpid()}

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
        return await self.engine.abort(request_ids)

    async def wait_idle(self, timeout: float, request_ids: list[str] | None) -> None:
        await self.engine.wait_idle(timeout, request_ids)

    async def update_weights(self, tensors: dict[str, Any], version: int, keep_requests: bool,
                             recompute_kv: bool) -> int:
        return await self.engine.update_weights(tensors, version=version, keep_requests=keep_requests,
                                                recompute_kv=recompute_kv)

    async def set_policy_version(self, version: int) -> None:
        self.engine.policy_version = version

    async def describe(self) -> dict[str, Any]:
        """What the engine itself holds (for checks; the client keeps its own copies)."""
        return {"policy_version": self.engine.policy_version, "open_requests": len(self.engine.active_requests),
                "pid": os.getpid()}

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


class RemoteEngine:
    """The client handle of one engine actor (see the module doc)."""

    def __init__(self, actor: Any, settings: EngineSettings, name: str) -> None:
        self.actor, self.settings, self.name = actor, settings, name
        self._version = 0
        self._max_model_len = settings.max_model_len
        self._active: set[str] = set()
        self._lost: str | None = None
        self._tokenizer: Any = None

    @classmethod
    def create(cls, settings: EngineSettings, name: str, num_cpus: float = 1.0, num_gpus: float = 0.0,
               env: dict[str, str] | None = None, backend: str = "shared_memory",
               slot: tuple[int, int] = (0, 1), **options: Any) -> "RemoteEngine":
        """A new engine actor (not started yet: `await start()`); `backend` moves its weights
        from the actor's process into its vLLM workers (see rollout/weight_transfer.py);
        `slot` = (index, engines) picks its share of a CPU machine's cores (`cpu_share`)."""
        import ray

        host = ray.remote(EngineHost).options(num_cpus=num_cpus, num_gpus=num_gpus, name=name,
                                              max_concurrency=10_000, **options)
        return cls(host.remote(settings, env, backend, slot), settings, name)

    async def start(self) -> "RemoteEngine":
        info = await self._call(self.actor.start.remote())
        self._max_model_len = int(info["max_model_len"])
        self.pid = int(info["pid"])
        return self

    async def _call(self, ref: Any) -> Any:
        if self._lost:
            raise EngineLost(self._lost)
        with self._deaths_as_lost():
            return await ref

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
        if not self._lost:
            self.actor.set_policy_version.remote(self._version)  # ordered before later calls

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def errored(self) -> bool:
        return self._lost is not None

    @property
    def active_requests(self) -> set[str]:
        return set(self._active)

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
        self._active.add(rid)
        chunks = self.actor.stream.options(num_returns="streaming").remote(
            prompt_ids, max_tokens, sampling, rid)
        finished = False
        try:
            with self._deaths_as_lost():
                async for ref in chunks:
                    chunk = await ref
                    finished = chunk.finish_reason is not None
                    yield chunk
        finally:
            self._active.discard(rid)
            if not finished and not self._lost:  # cancelled here: the request must not run on
                self.actor.abort.remote([rid])

    async def generate(self, prompt_ids: list[int], max_tokens: int,
                       sampling: SamplingSettings = SamplingSettings(),
                       request_id: str | None = None) -> TokenChunk:
        rid = request_id or uuid.uuid4().hex
        self._active.add(rid)
        try:
            return await self._call(self.actor.generate.remote(prompt_ids, max_tokens, sampling, rid))
        finally:
            self._active.discard(rid)

    async def abort(self, request_ids: Iterable[str]) -> int:
        ids = [r for r in request_ids if r in self._active]
        if ids and not self._lost:
            await self._call(self.actor.abort.remote(ids))
        return len(ids)

    async def wait_idle(self, timeout: float = 10.0, request_ids: Iterable[str] | None = None) -> None:
        if self._lost:
            return  # a dead engine runs nothing
        ids = None if request_ids is None else list(request_ids)
        await self._call(self.actor.wait_idle.remote(timeout, ids))

    # ---- weights and lifecycle -----------------------------------------------------------

    async def update_weights(self, named_tensors: NamedTensors | Any, version: int | None = None,
                             keep_requests: bool = False, recompute_kv: bool = False) -> int:
        """Load weights (named tensors, or an object-store ref of a name -> tensor dict)."""
        import ray

        if not isinstance(named_tensors, ray.ObjectRef):
            named_tensors = ray.put(to_cpu_unshared(pairs(named_tensors)))
        target = self._version + 1 if version is None else int(version)
        self._version = await self._call(
            self.actor.update_weights.remote(named_tensors, target, keep_requests, recompute_kv))
        return self._version

    async def sleep(self, level: int = 1) -> None:
        await self._call(self.actor.sleep.remote(level))

    async def wake_up(self) -> None:
        await self._call(self.actor.wake_up.remote())

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

