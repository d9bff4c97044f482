"""A simulated continuous-batching engine in virtual time, and the event loop whose clock it uses.

`VirtualTimeLoop` is an asyncio event loop whose `time()` is a virtual clock: when the loop has
nothing ready to run, its selector moves the clock to the next timer instead of sleeping, so a
simulated second costs no real time. There is no I/O in a simulation; keep threads out too (an
async scorer, no `to_thread`): a thread's wake-up would be seen, but the clock does not wait for it.

`SimEngine` is an `Engine` (rollout/engine_api.py), what `EnginePool` and `AprilScheduler` drive
(`stream`, `abort`, `wait_idle`, `update_weights`, `policy_version`, ...). It models one engine of a continuous-
batching server (vLLM's scheduler, coarsely) on a timeline of decode iterations:
- an iteration costs `(base_s + per_seq_s * running) * slowdown` virtual seconds (plus
  `prefill_per_token_s` per context token of the requests it admits, beyond the first
  `prefill_free_tokens` of each) and gives every running
  request one token; the batch changes only at iteration boundaries: finished requests leave,
  queued ones join (FIFO, at most `max_batch` running); a request that arrives when an iteration
  has just started (no time spent on it yet) joins that iteration;
- a request generates `max_tokens` tokens and finishes `length`, or, with `stop_at`, stops
  early (`stop`) where `stop_at(request_id, prompt_ids)` says (lengths the router cannot see);
- tokens are delivered every `chunk` iterations and when a request finishes; with `quantum` > 0
  deliveries happen on a grid of `quantum` virtual seconds (the engine computes on regardless),
  so hundreds of engines wake the scheduler together rather than one by one;
- `abort(ids)` ends those streams at once with every token of the iterations completed so far,
  then an empty `aborted` chunk (a request aborted mid-iteration loses that iteration's token);
- `update_weights` waits for idle, costs `sync_s`, and sets the version;
- `die_at=T`: at virtual time T the engine dies: `errored`, every open stream raises
  `EngineLost` (tokens not yet delivered are lost), and every later call raises it too.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import selectors
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from rollover.rollout.engine import TokenChunk
from rollover.rollout.engine_api import SingleEngine
from rollover.rollout.remote import EngineLost

T = TypeVar("T")


# ---- virtual time ----------------------------------------------------------------------------


class SimulationStuck(RuntimeError):
    """Nothing is scheduled, nothing is ready and no I/O came: virtual time cannot move on."""


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real I/O without waiting; a wait of `timeout` moves the loop's clock instead."""

    def __init__(self, loop: "VirtualTimeLoop") -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None):
        if timeout is None:  # no timer at all: only another thread could wake the loop
            ready = super().select(self._loop.real_wait_s)
            if not ready:
                raise SimulationStuck("no timer, no ready callback, no I/O: every task waits forever")
            return ready
        ready = super().select(0)
        if not ready and timeout > 0:
            self._loop.advance(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock (seconds, from `start`); see the module doc."""

    def __init__(self, start: float = 0.0, real_wait_s: float = 5.0) -> None:
        self._now = float(start)
        self.real_wait_s = real_wait_s
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def run_as_driver(main: Callable[[], Any]) -> Any:
    """A simulator's entry point: `main()` with the garbage collector as rl-train sets it for its
    driver (trainer/runtime/heap.py), so the simulated loop runs under the product's conditions.
    Only for a process's own entry: tests call the `main`s directly and keep Python's defaults."""
    from rollover.trainer.runtime.heap import tune_collector

    tune_collector("bench.sim")
    return main()


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a fresh `VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)


# ---- the engine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimCosts:
    """Virtual seconds an engine spends (defaults: this machine's CPU engine, see simulate_scale)."""

    base_s: float = 2.79e-3  # per decode iteration
    per_seq_s: float = 7.27e-5  # per decode iteration and running request
    sync_s: float = 0.047  # one weight load (wait for idle + load + cache reset)
    prefill_per_token_s: float = 0.0  # per context (prompt + response) token of an admitted request
    prefill_free_tokens: int = 0  # context tokens per request already inside the decode costs

    def iteration(self, running: int) -> float:
        return self.base_s + self.per_seq_s * running


class _Request:
    __slots__ = ("rid", "total", "finish", "version", "context", "start_it", "delivered",
                 "chunks", "waiter", "ended")

    def __init__(self, rid: str, total: int, finish: str, version: int, context: int) -> None:
        self.rid, self.total, self.finish, self.version = rid, total, finish, version
        self.context = context  # tokens to prefill when admitted
        self.start_it = -1  # engine iterations completed before it joined (-1: queued)
        self.delivered = 0  # tokens streamed so far
        self.chunks: deque = deque()
        self.waiter: asyncio.Future | None = None
        self.ended = False  # its last chunk (or the engine's death) is queued

    def push(self, chunk: Any) -> None:
        self.chunks.append(chunk)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


_LOST = object()  # queued instead of a chunk when the engine dies
_EPS = 1e-12


class SimEngine(SingleEngine):
    """One simulated engine (see the module doc). `slowdown` > 1: a slower engine."""

    def __init__(self, name: str | int = 0, costs: SimCosts = SimCosts(), *, slowdown: float = 1.0,
                 max_batch: int = 256, chunk: int = 16, quantum: float = 0.0, max_model_len: int = 512,
                 stop_at: Callable[[str, list[int]], int] | None = None,
                 die_at: float | None = None) -> None:
        self.name = name
        self.costs = costs
        self.slowdown = slowdown
        self.max_batch = max_batch
        self.chunk = max(1, int(chunk))
        self.quantum = quantum
        self.max_model_len = max_model_len
        self.stop_at = stop_at
        self.die_at = die_at
        self.policy_version = 0
        self.errored = False
        self.requests: dict[str, _Request] = {}  # open streams
        self._running: dict[str, _Request] = {}
        self._ends: list[tuple[int, int, _Request]] = []  # heap: (last iteration, seq, request)
        self._seq = 0
        self._waiting: deque[_Request] = deque()
        self._it = 0  # iterations completed
        self._iter_start: float | None = None  # the iteration under way (None: idle)
        self._iter_dt = 0.0
        self._iter_prefill = 0  # context tokens the iteration under way admitted
        self._timer: asyncio.TimerHandle | None = None
        self._started = False
        self._idle_waiters: list[asyncio.Future] = []
        self._loading = False
        self._loaded: asyncio.Event | None = None
        # accounting (virtual seconds, tokens)
        self.busy_s = 0.0
        self.tokens = 0
        self.iterations = 0
        self.loads = 0

    # ---- what the pool reads ------------------------------------------------------------------

    @property
    def active_requests(self) -> set[str]:
        return set(self.requests)

    def decode(self, token_ids: list[int]) -> str:
        return ""

    def busy_at(self, now: float) -> float:
        """Virtual seconds spent computing up to `now` (the iteration under way counted so far)."""
        if self._iter_start is None or now <= self._iter_start:
            return self.busy_s
        return self.busy_s + min(now - self._iter_start, self._iter_dt)

    def outstanding(self) -> int:
        """Tokens still to generate for the open requests (the work this engine really holds)."""
        if self.errored:
            return 0
        return sum(r.total - self._done(r) for r in self.requests.values() if not r.ended)

    def mark_lost(self, why: str = "") -> None:
        self._die()

    # ---- requests -----------------------------------------------------------------------------

    async def stream(self, prompt_ids: list[int], max_tokens: int, sampling: Any = None,
                     request_id: str | None = None) -> AsyncIterator[TokenChunk]:
        loop = asyncio.get_running_loop()
        self._start(loop)
        if self.errored:
            raise EngineLost(f"sim engine {self.name} is dead")
        while self._loading:
            await self._loaded.wait()
        rid = request_id or f"r{id(object())}"
        if rid in self.requests:
            raise ValueError(f"request id {rid} is already open")
        budget = max(0, min(int(max_tokens), self.max_model_len - len(prompt_ids)))
        finish = "length"
        if self.stop_at is not None:
            left = max(0, int(self.stop_at(rid, prompt_ids)))
            if left < budget:
                budget, finish = left, "stop"
        if budget == 0:
            yield TokenChunk([], [], self.policy_version, finish)
            return
        r = _Request(rid, budget, finish, self.policy_version, len(prompt_ids))
        self.requests[rid] = r
        now = loop.time()
        self._advance(now)
        self._waiting.append(r)
        if self._iter_start is None or self._iter_start >= now - _EPS:  # nothing spent yet: join now
            self._begin_iteration(now)
        self._schedule(loop)
        try:
            while True:
                while r.chunks:
                    chunk = r.chunks.popleft()
                    if chunk is _LOST:
                        raise EngineLost(f"sim engine {self.name} died")
                    yield chunk
                    if chunk.finish_reason:
                        return
                r.waiter = loop.create_future()
                await r.waiter
                r.waiter = None
        finally:
            if not r.ended:  # the caller stopped listening (cancelled): the request is aborted
                self._end(r, None)
            self.requests.pop(rid, None)
            self._notify_idle()

    async def generate(self, prompt_ids: list[int], max_tokens: int, sampling: Any = None,
                       request_id: str | None = None) -> TokenChunk:
        ids: list[int] = []
        last = None
        async for chunk in self.stream(prompt_ids, max_tokens, sampling, request_id):
            ids += chunk.token_ids
            last = chunk
        return TokenChunk(ids, [0.0] * len(ids), last.version, last.finish_reason)

    async def abort(self, request_ids: Iterable[str]) -> int:
        if self.errored:
            raise EngineLost(f"sim engine {self.name} is dead")
        # The pool sends every engine every id: look up whichever side is smaller.
        ids = request_ids if isinstance(request_ids, (set, frozenset)) else set(request_ids)
        mine = [self.requests[i] for i in ids if i in self.requests] if len(ids) < len(self.requests) \
            else [r for i, r in self.requests.items() if i in ids]
        n = 0
        for r in mine:
            if not r.ended:
                self._end(r, "aborted")
                n += 1
        return n

    async def wait_idle(self, timeout: float = 10.0, request_ids: Iterable[str] | None = None) -> None:
        if self.errored:
            raise EngineLost(f"sim engine {self.name} is dead")
        mine = None if request_ids is None else set(request_ids)
        if mine is not None:
            await self.abort(mine & set(self.requests))

        def busy() -> bool:
            return bool(self.requests if mine is None else mine & set(self.requests))

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while busy():
            if loop.time() >= deadline:
                raise TimeoutError(f"sim engine {self.name} not idle after {timeout} s")
            waiter = loop.create_future()
            self._idle_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - loop.time())
            except TimeoutError:
                pass

    async def update_weights(self, named_tensors: Any, version: int | None = None, keep_requests: bool = False,
                             recompute_kv: bool = False) -> int:
        if self.errored:
            raise EngineLost(f"sim engine {self.name} is dead")
        if not keep_requests:
            await self.wait_idle()
        self._loading = True
        self._loaded = asyncio.Event()
        try:
            await asyncio.sleep(self.costs.sync_s)
            if self.errored:
                raise EngineLost(f"sim engine {self.name} died while loading weights")
            self.policy_version = self.policy_version + 1 if version is None else int(version)
            self.loads += 1
        finally:
            self._loading = False
            self._loaded.set()
        return self.policy_version

    async def sleep(self, level: int = 1) -> None:
        pass

    async def wake_up(self) -> None:
        pass

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    # ---- the iteration timeline ---------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """The death timer starts with the first request, on the running loop."""
        if not self._started:
            self._started = True
            if self.die_at is not None:
                loop.call_at(self.die_at, self._die)

    def _done(self, r: _Request) -> int:
        """Tokens the request has generated by the last completed iteration."""
        return 0 if r.start_it < 0 else min(r.total, self._it - r.start_it)

    def _begin_iteration(self, at: float) -> None:
        """Admit queued requests and start an iteration at `at` (or go idle). Called again at
        the same instant (a request arrived as the iteration started), it re-prices it."""
        if self._iter_start is None:
            self._iter_prefill = 0
        while self._waiting and len(self._running) < self.max_batch:
            r = self._waiting.popleft()
            if r.ended:
                continue
            r.start_it = self._it
            self._running[r.rid] = r
            self._seq += 1
            heapq.heappush(self._ends, (self._it + r.total, self._seq, r))
            self._iter_prefill += max(0, r.context - self.costs.prefill_free_tokens)
        self._price(at)

    def _price(self, at: float) -> None:
        """The iteration starting at `at` for the running batch (idle if there is none)."""
        if not self._running:
            self._iter_start = None
            return
        self._iter_start = at
        self._iter_dt = (self.costs.iteration(len(self._running))
                         + self._iter_prefill * self.costs.prefill_per_token_s) * self.slowdown

    def _advance(self, now: float) -> None:
        """Run every iteration that completes by `now`; deliver what is due."""
        while self._iter_start is not None and self._iter_start + self._iter_dt <= now + _EPS:
            end = self._iter_start + self._iter_dt
            self.busy_s += self._iter_dt
            self._it += 1
            self.iterations += 1
            self.tokens += len(self._running)
            ends = self._ends
            while ends and (ends[0][0] <= self._it or ends[0][2].ended):
                _, _, r = heapq.heappop(ends)
                if not r.ended:
                    self._deliver(r, r.finish)
            if self._it % self.chunk == 0:
                for r in self._running.values():
                    self._deliver(r, None)
            self._iter_start = None
            self._begin_iteration(end)

    def _deliver(self, r: _Request, finish: str | None) -> None:
        """Stream the tokens generated and not yet delivered (with `finish`: the last chunk)."""
        n = self._done(r) - r.delivered
        if n > 0 or finish:
            r.delivered += n
            r.push(TokenChunk([0] * n, [0.0] * n, r.version, finish))
        if finish:
            r.ended = True
            self._running.pop(r.rid, None)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """(Re)arm the timer for the next delivery: a request's end or a chunk boundary."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._iter_start is None or self.errored:
            return
        it_next = self.chunk - self._it % self.chunk
        while self._ends and self._ends[0][2].ended:
            heapq.heappop(self._ends)
        if self._ends:
            it_next = min(it_next, self._ends[0][0] - self._it)
        if self._waiting and len(self._running) < self.max_batch:
            it_next = 1  # the batch grows at the next boundary: re-price from there
        # the iteration under way, then it_next - 1 more at the current batch's price
        dt = self.costs.iteration(len(self._running)) * self.slowdown
        when = self._iter_start + self._iter_dt + (max(1, it_next) - 1) * dt
        if self.quantum > 0:
            when = math.ceil(when / self.quantum - 1e-9) * self.quantum
        self._timer = loop.call_at(when, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self.errored:
            return
        self._advance(loop.time())
        self._schedule(loop)

    def _end(self, r: _Request, reason: str | None) -> None:
        """End a request now: the tokens of the iterations it completed, then `reason`."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._advance(now)
        running = r.rid in self._running
        if reason is not None:
            if running:
                self._deliver(r, reason)
            else:
                r.push(TokenChunk([], [], r.version, reason))
        r.ended = True
        self._running.pop(r.rid, None)
        if running and self._iter_start is not None and self._iter_start >= now - _EPS:
            self._price(now)  # it left as the iteration started: nothing was spent on it
        self._schedule(loop)

    def _notify_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _die(self) -> None:
        if self.errored:
            return
        self.errored = True
        for r in list(self.requests.values()):
            r.ended = True
            r.push(_LOST)
        self._running.clear()
        self._waiting.clear()
        self._ends.clear()
        self._iter_start = None
        if self._timer is not None:
            self._timer.cancel()
        self._notify_idle()
