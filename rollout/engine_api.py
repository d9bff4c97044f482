"""The engine interface: what the scheduler, the pipeline, group runs, the pool and the trainer
call on an engine, declared once.

Four classes satisfy `Engine`: `RolloutEngine` (one vLLM engine in this process),
`RemoteEngine` (the client of one in a Ray actor), `EnginePool` (many driven as one) and the
simulator's `SimEngine` (bench/sim/sim_engine.py); `tests/unit/test_engine_api.py` compares
their members and signatures with this file. Nobody asks an engine what it is: a pool says so
through `router()`, and what a pool needs of its members is declared here too (`PoolMember`).

- `Engine`: serve requests (`stream`, `generate`, `abort`, `wait_idle`), the policy version it
  stamps tokens with, weight loads, sleep and wake-up, shutdown.
- `ProbedEngine`: also reports what it serves for the check after every load (`weight_probe`,
  rollout/weights/weight_check.py); the simulator has no weights, so it is an `Engine` only.
- `PoolMember`: an engine a pool can declare dead (`mark_lost`).
- `Router`: how a pool spreads groups over its members; `Lease`: one group's place on one.
- `SingleEngine`: the defaults of an engine that is not a pool (base of the engine classes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from rollover.rollout.settings import SamplingSettings

if TYPE_CHECKING:
    from rollover.rollout.engine import TokenChunk
    from rollover.rollout.weights.weight_check import EngineReading


class Engine(Protocol):
    """What every engine does (one engine, a remote one, a pool, a simulated one)."""

    # The policy version that stamps new requests' tokens. Setting it (after a checkpoint
    # restore) makes the engine serve its current weights as that version.
    policy_version: int

    @property
    def max_model_len(self) -> int:
        """Prompt + response tokens one request may hold."""
        ...

    @property
    def errored(self) -> bool:
        """True once the engine is dead (every later request would fail)."""
        ...

    @property
    def active_requests(self) -> set[str]:
        """Request ids whose stream is still open."""
        ...

    @property
    def takes_local_tensors(self) -> bool:
        """`update_weights` wants the trainer's own tensors (it broadcasts from them): no copy."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text with the served model's tokenizer."""
        ...

    def stream(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingSettings = ...,
               request_id: str | None = None) -> AsyncIterator[TokenChunk]:
        """Yield tokens as they are sampled; the last chunk has the finish reason."""
        ...

    async def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingSettings = ...,
                       request_id: str | None = None) -> TokenChunk:
        """One whole response (evaluation)."""
        ...

    async def abort(self, request_ids: Iterable[str]) -> int:
        """End those requests' streams with `aborted`; how many were open."""
        ...

    async def wait_idle(self, timeout: float = 10.0, request_ids: Iterable[str] | None = None) -> None:
        """Wait until the requests (the given ones, or all) are gone."""
        ...

    async def update_weights(self, named_tensors: Any, version: int | None = None,
                             keep_requests: bool = False, recompute_kv: bool = False) -> int:
        """Load new weights; return the policy version now served."""
        ...

    async def sleep(self, level: int = 1) -> None:
        """Free the engine's accelerator memory (no-op without sleep mode)."""
        ...

    async def wake_up(self) -> None:
        """Serve again after `sleep`."""
        ...

    def router(self) -> Router | None:
        """How groups are spread over engines: a pool's `Router`; None for one engine, which
        takes every request itself."""
        ...

    def shutdown(self) -> None:
        """Stop the engine (and its processes or actor)."""
        ...


class ProbedEngine(Engine, Protocol):
    """An engine that serves real weights: the check after every load reads them."""

    async def weight_probe(self, token_ids: list[int]) -> list[EngineReading]:
        """Its version and the log-prob of each of `token_ids` after its prefix, per engine."""
        ...


class PoolMember(Engine, Protocol):
    """What a pool needs of each of its engines beyond `Engine`."""

    def mark_lost(self, why: str) -> None:
        """The pool declared this engine dead: refuse every later call."""
        ...


class Lease(Protocol):
    """Where one group runs in a pool, and the tokens it may still generate there."""

    @property
    def member(self) -> Any:
        """The pool member to stream on (reports the engine's death to the pool)."""
        ...

    @property
    def valid(self) -> bool:
        """The engine it was routed to still serves."""
        ...

    def use(self, tokens: int) -> None:
        """`tokens` of the lease were generated (or will not be)."""
        ...

    def release(self) -> None:
        """The group is done here: the rest of the lease is no load."""
        ...


class Router(Protocol):
    """A pool's routing: each time a group runs it goes to one live member."""

    revivals: int  # dead engines replaced so far

    @property
    def live(self) -> Sequence[Any]:
        """The members serving now."""
        ...

    async def acquire(self, tokens: int = 0) -> Lease:
        """A lease on the least-loaded live member, waiting for a replacement while none is
        alive; `AllEnginesLost` when none comes back."""
        ...


class SingleEngine:
    """The `Engine` members whose answer is the same for every engine that is not a pool."""

    takes_local_tensors: ClassVar[bool] = False  # its loads take a CPU copy (or any tensors)

    def router(self) -> None:
        """One engine takes every request itself: no routing."""
        return None
