"""CPU time of one coroutine's own code: what the scheduler itself costs the driver process.

The scheduler shares its event loop with the group runs (token streaming), the engines' clients
and, under the pipeline, its own caller. Wall time says nothing about its cost and a profiler is
too heavy to leave on, so `CpuClock.measure(coro)` runs `coro` and adds up
`time.thread_time()` only while `coro`'s own frames execute: the clock stops at every
suspension (an `await` that yields to the loop) and starts again when the loop resumes it.

`thread_time`, not `process_time`: the scoring pool's threads, vLLM's in-process threads and, in
a pipelined run, the trainer's update thread all run in the same process; `process_time` would
charge their work to the scheduler. The event loop is one thread, and while `coro` runs nothing
else runs on it, so the thread's CPU over those stretches is the coroutine's own.

Whatever runs synchronously inside `coro` counts: a user's group filter, the synchronous part of
an engine's abort fan-out, and the bookkeeping inside `asyncio.wait` (registering a callback on
every awaited task), which is the cost this clock was made to expose. `pause()` excludes a
stretch the coroutine awaits on someone else's behalf (a weight load run as an interrupt).

The cyclic garbage collector is not counted (`gc_seconds` has it apart): a collection runs in
whatever code happens to allocate when a threshold is crossed, and a full one walks every
object of the process, so its cost follows the whole heap (at 256 simulated engines it was
three quarters of the scheduler's thread CPU), not the scheduler's work.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Awaitable, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class CpuClock:
    """Accumulates thread CPU seconds while the coroutines it measures run (see module doc)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = None  # thread_time when the clock last started; None: stopped
        self._paused = 0  # open `pause` stretches: the clock stays off through their suspensions
        self.gc_seconds = 0.0  # collector runs inside measured stretches (not in `seconds`)
        self._gc_since: float | None = None  # a collection that stopped the clock is under way
        self._thread = threading.get_ident()

    def start(self) -> None:
        if self._since is None and not self._paused:
            self._since = time.thread_time()

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += time.thread_time() - self._since
            self._since = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """gc.callbacks hook: stop the clock for a collection on our thread, time it apart."""
        if threading.get_ident() != self._thread:
            return
        if phase == "start":
            if self._since is not None:  # inside a measured stretch
                self.stop()
                self._gc_since = time.thread_time()
        elif self._gc_since is not None:
            self.gc_seconds += time.thread_time() - self._gc_since
            self._gc_since = None
            self.start()

    async def measure(self, awaitable: Awaitable[T]) -> T:
        """`await clock.measure(coro)`: coro's result, its own CPU added to `seconds`."""
        return await _Measured(awaitable, self)

    async def pause(self, awaitable: Awaitable[T]) -> T:
        """`await clock.pause(coro)` inside a measured coroutine: coro's CPU is not counted."""
        return await _Paused(awaitable, self)


class _Measured:
    """Drives the wrapped awaitable, with the clock on while it runs and off while suspended."""

    __slots__ = ("_awaitable", "_clock")

    def __init__(self, awaitable: Awaitable[Any], clock: CpuClock) -> None:
        self._awaitable, self._clock = awaitable, clock

    def __await__(self) -> Generator[Any, Any, Any]:
        clock = self._clock
        inner = self._awaitable.__await__()
        send: Any = inner.send
        value: Any = None
        clock._thread = threading.get_ident()
        gc.callbacks.append(clock._on_gc)
        clock.start()
        try:
            while True:
                try:
                    yielded = send(value)
                except StopIteration as done:
                    return done.value
                clock.stop()
                try:
                    value = yield yielded
                    send = inner.send
                except GeneratorExit:
                    inner.close()
                    raise
                except BaseException as exc:  # noqa: BLE001 - passed on to the wrapped awaitable
                    send, value = inner.throw, exc
                clock.start()
        finally:
            clock.stop()
            gc.callbacks.remove(clock._on_gc)


class _Paused(_Measured):
    """The opposite of `_Measured`: the clock is off while the wrapped awaitable runs."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, Any]:
        clock = self._clock
        running = clock._since is not None
        clock.stop()
        clock._paused += 1
        try:
            return (yield from self._awaitable.__await__())
        finally:
            clock._paused -= 1
            if running:
                clock.start()
