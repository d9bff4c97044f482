"""Many engines behind one APRIL scheduler: routing, fan-out, and engines that die and come back.

`EnginePool` has the engine's interface (`Engine`, rollout/engine_api.py), so the scheduler, the
evaluator and the trainer drive N engines (in-process `RolloutEngine`s or Ray-hosted
`RemoteEngine`s) as they drive one; `router()` returns the pool itself (a `Router`):
- **Routing.** A group, each time it runs (fresh, or resumed from the buffer), goes to the live
  engine with the fewest outstanding tokens (budgets of its open requests minus what they have
  streamed), and all its samples stay there (they share a prompt: one prefix in one cache).
  At step boundaries this moves buffered partial groups to the least-loaded engine.
- **Fan-out.** Abort, wait-idle, sleep, wake-up and weight loads go to every live engine; a
  weight load gives every engine the same explicit version. The pool's `policy_version` is the
  lowest any live engine serves, so staleness is never under-counted.
- **Migration.** A sample whose engine dies keeps every token it streamed (`EngineLost` ends the
  stream) and its group continues on another live engine from those token ids (the runner asks
  `route()` again). The dead engine is replaced in the background (`replace(index)` builds a new
  one), loads the latest weights at the pool's version, and rejoins; nothing is generated twice
  because only streamed tokens exist for the scheduler. With no engine alive (a one-engine pool)
  `acquire()` waits for the replacement, up to `revival_timeout_s`: the groups are not failed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rollover.rollout.engine import TokenChunk
from rollover.rollout.engine_api import PoolMember
from rollover.rollout.remote import EngineLost
from rollover.rollout.settings import SamplingSettings
from rollover.rollout.weights.weight_sync import NamedTensors, pairs, to_cpu_unshared

log = logging.getLogger(__name__)

Replace = Callable[[int], Awaitable[Any]]  # member index -> a started engine to take its place


@dataclass
class Member:
    """One engine of the pool and what the pool knows about its load."""

    engine: PoolMember
    index: int
    on_lost: Callable[["Member", Any], None]
    outstanding_tokens: int = 0  # tokens the groups routed here may still generate
    reviving: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return not self.engine.errored and self.reviving is None

    async def stream(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingSettings,
                     request_id: str) -> AsyncIterator[TokenChunk]:
        """The engine's stream; an engine found dead is reported to the pool."""
        engine = self.engine
        try:
            async for chunk in engine.stream(prompt_ids, max_tokens, sampling, request_id=request_id):
                yield chunk
        except EngineLost:
            self.on_lost(self, engine)
            raise


@dataclass
class Lease:
    """Tokens a group may still generate on a member: counted in its load from routing on."""

    member: Member
    tokens: int

    def __post_init__(self) -> None:
        self.engine = self.member.engine  # a replacement starts at zero load: not ours to count
        self.member.outstanding_tokens += self.tokens

    def use(self, tokens: int) -> None:
        used = min(tokens, self.tokens)
        self.tokens -= used
        if self.member.engine is self.engine:
            self.member.outstanding_tokens -= used

    def release(self) -> None:
        self.use(self.tokens)

    @property
    def valid(self) -> bool:
        """The engine it was routed to still serves (not dead, not replaced since)."""
        return self.member.alive and self.member.engine is self.engine


class AllEnginesLost(EngineLost):
    """No engine of the pool is alive (and none could be brought back)."""


class EnginePool:
    """N engines driven as one (see the module doc). `replace` rebuilds a dead engine."""

    def __init__(self, engines: list[PoolMember], replace: Replace | None = None, max_revivals: int = 8,
                 revival_timeout_s: float = 900.0) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.members = [Member(engine, i, self.lost) for i, engine in enumerate(engines)]
        self.replace = replace
        self.max_revivals = max_revivals
        self.revival_timeout_s = revival_timeout_s  # how long `acquire` waits for a replacement
        self.revivals = 0  # engines replaced so far
        self.migrations = 0  # samples that continued on another engine after theirs died
        self._max_model_len = min(e.max_model_len for e in engines)
        self._version = max(e.policy_version for e in engines)
        self._weights: Any = None  # the latest full set (object-store ref or tensors), for revivals

    # ---- what the scheduler reads ----------------------------------------------------------

    @property
    def live(self) -> list[Member]:
        return [m for m in self.members if m.alive]

    @property
    def policy_version(self) -> int:
        """The lowest version a live engine serves (the pool's target when none is live)."""
        return min((m.engine.policy_version for m in self.live), default=self._version)

    @policy_version.setter
    def policy_version(self, version: int) -> None:
        self._version = int(version)
        for m in self.live:
            m.engine.policy_version = self._version

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def errored(self) -> bool:
        """True when no engine is alive and none is coming back."""
        return not self.live and not any(m.reviving for m in self.members)

    @property
    def active_requests(self) -> set[str]:
        return set().union(*(m.engine.active_requests for m in self.members if not m.engine.errored))

    @property
    def takes_local_tensors(self) -> bool:
        """Every member takes the trainer's own tensors (nccl: it broadcasts from them)."""
        return bool(self.members) and all(m.engine.takes_local_tensors for m in self.members)

    def router(self) -> "EnginePool":
        """The pool routes each group to one member (`acquire`, `live`, `revivals`)."""
        return self

    def decode(self, token_ids: list[int]) -> str:
        """With any live engine's tokenizer (they all serve one model): no load to balance."""
        live = self.live
        return (live[0] if live else self.members[0]).engine.decode(token_ids)

    def load(self) -> list[int]:
        """Outstanding tokens per engine, in member order (dead engines: -1)."""
        return [m.outstanding_tokens if m.alive else -1 for m in self.members]

    def route(self, tokens: int = 0) -> Lease:
        """The live engine with the fewest outstanding tokens (ties: the lowest index), with
        `tokens` counted in its load until the lease is used up or released."""
        live = self.live
        if not live:
            raise AllEnginesLost("every engine of the pool is dead" +
                                 (" (replacements are starting)" if not self.errored else ""))
        return Lease(min(live, key=lambda m: (m.outstanding_tokens, m.index)), tokens)

    async def acquire(self, tokens: int = 0) -> Lease:
        """`route(tokens)`, waiting for a replacement while no engine is alive but one is
        starting (a one-engine pool survives its engine's death). AllEnginesLost when none is
        coming back, or none is back within `revival_timeout_s`."""
        deadline = asyncio.get_running_loop().time() + self.revival_timeout_s
        while not self.live:
            starting = [m.reviving for m in self.members if m.reviving is not None]
            left = deadline - asyncio.get_running_loop().time()
            if not starting or left <= 0:
                raise AllEnginesLost("every engine of the pool is dead" + (
                    f" (no replacement was back within {self.revival_timeout_s:.0f} s)" if starting else ""))
            await asyncio.wait(starting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        return self.route(tokens)

    # ---- requests ----------------------------------------------------------------------------

    async def stream(self, prompt_ids: list[int], max_tokens: int,
                     sampling: SamplingSettings = SamplingSettings(),
                     request_id: str | None = None) -> AsyncIterator[TokenChunk]:
        """One request on the least-loaded live engine. A group runner leases a member for a
        whole group instead (`router()`); here the request is its own group. If its engine
        dies the stream ends with `EngineLost` and the tokens streamed so far."""
        lease = await self.acquire(max_tokens)
        try:
            async for chunk in lease.member.stream(prompt_ids, max_tokens, sampling,
                                                   request_id or uuid.uuid4().hex):
                lease.use(len(chunk.token_ids))
                yield chunk
        finally:
            lease.release()

    async def generate(self, prompt_ids: list[int], max_tokens: int,
                       sampling: SamplingSettings = SamplingSettings(),
                       request_id: str | None = None) -> TokenChunk:
        """A whole response (evaluation); retried on another engine if its engine dies."""
        while True:
            lease = await self.acquire(max_tokens)
            engine = lease.member.engine
            try:
                return await engine.generate(prompt_ids, max_tokens, sampling, request_id)
            except EngineLost:
                self.lost(lease.member, engine)
            finally:
                lease.release()

    async def abort(self, request_ids: Iterable[str]) -> int:
        ids = list(request_ids)
        counts = await self._each(lambda e: e.abort(ids))
        return sum(counts)

    async def wait_idle(self, timeout: float = 10.0, request_ids: Iterable[str] | None = None) -> None:
        ids = None if request_ids is None else list(request_ids)
        await self._each(lambda e: e.wait_idle(timeout, ids))

    async def sleep(self, level: int = 1) -> None:
        await self._each(lambda e: e.sleep(level))

    async def wake_up(self) -> None:
        await self._each(lambda e: e.wake_up())

    async def weight_probe(self, token_ids: list[int]) -> list[Any]:
        """Every live engine's probe reading (rollout/weights/weight_check.py), in member order."""
        ids = list(token_ids)
        return [reading for readings in await self._each(lambda e: e.weight_probe(ids))
                for reading in readings]

    async def _each(self, call: Callable[[Any], Awaitable[Any]]) -> list[Any]:
        """`call` on every live engine at once; an engine found dead is replaced, not an error."""
        live = [(m, m.engine) for m in self.live]
        results = await asyncio.gather(*(call(engine) for _, engine in live), return_exceptions=True)
        out = []
        for (member, engine), result in zip(live, results):
            if isinstance(result, EngineLost):
                self.lost(member, engine)
            elif isinstance(result, BaseException):
                raise result
            else:
                out.append(result)
        if self.errored:
            raise AllEnginesLost("every engine of the pool is dead")
        return out

    # ---- weights -----------------------------------------------------------------------------

    async def update_weights(self, named_tensors: NamedTensors | dict[str, Any], version: int | None = None,
                             keep_requests: bool = False, recompute_kv: bool = False) -> int:
        """Load the same weights into every live engine at one version; return it."""
        target = self._version + 1 if version is None else int(version)
        self._weights = self._shareable(named_tensors)
        self._version = target
        await self._each(lambda e: e.update_weights(self._weights, version=target,
                                                    keep_requests=keep_requests, recompute_kv=recompute_kv))
        return target

    def _shareable(self, named_tensors: Any) -> Any:
        """One copy every engine can take: the tensors as given when the engines take the
        trainer's own (nccl: broadcast from them, no copy, no object store), else an object-store
        ref when Ray runs, else CPU tensors."""
        if self.takes_local_tensors:
            return dict(pairs(named_tensors))
        tensors = to_cpu_unshared(pairs(named_tensors))
        try:
            import ray

            if ray.is_initialized():
                return ray.put(tensors)
        except ImportError:
            pass
        return tensors

    # ---- engines that die ---------------------------------------------------------------------

    def lost(self, member: Member, engine: Any = None) -> None:
        """`member`'s engine (`engine`, if given: a replaced one is old news) is dead: route
        nothing more to it, and start its replacement."""
        if member.reviving is not None or (engine is not None and engine is not member.engine):
            return
        member.engine.mark_lost("declared dead by the pool")
        if self.replace is None or self.revivals >= self.max_revivals:
            log.error("engine %d died; no replacement (%d so far)", member.index, self.revivals)
            return
        log.warning("engine %d died: its groups continue on the others; starting a replacement",
                    member.index)
        member.reviving = asyncio.ensure_future(self._revive(member))

    async def _revive(self, member: Member) -> None:
        """Build a new engine, bring it to the pool's weights and version, and let it rejoin."""
        self.revivals += 1
        try:
            engine = await self.replace(member.index)
            while engine.policy_version != self._version:  # loads may happen while it starts
                target = self._version
                if self._weights is None:
                    engine.policy_version = target
                else:
                    await engine.update_weights(self._weights, version=target)
            member.engine, member.outstanding_tokens = engine, 0
            log.warning("engine %d is back at policy version %d", member.index, self._version)
        except Exception as exc:  # noqa: BLE001 - the pool goes on with the engines it has
            log.error("engine %d could not be replaced: %r", member.index, exc)
        finally:
            member.reviving = None

    async def settle(self) -> None:
        """Wait for replacements under way (tests, shutdown)."""
        await asyncio.gather(*(m.reviving for m in self.members if m.reviving), return_exceptions=True)

    def shutdown(self) -> None:
        for m in self.members:
            if m.reviving is not None:
                m.reviving.cancel()
            try:
                m.engine.shutdown()
            except Exception as exc:  # noqa: BLE001 - the others still get shut down
                log.warning("engine %d did not shut down cleanly: %r", m.index, exc)
