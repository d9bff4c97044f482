"""Scoring groups off the event loop, with results that outlive the step that asked for them.

Two rules the scheduler relies on:
- A step never waits for a judge: when a step ends, scoring still running is left to finish in
  the background, and its result is *kept* (keyed by group uid). When the buffered group is
  resumed, it picks the result up instead of calling the judge again: one call per sample.
- Abandoned calls never starve the pool: `ScoringPool` counts at most `size` calls at once, but
  a call the scheduler stopped waiting for gives its slot back, so a hung judge costs a thread,
  never the pool. Threads are daemons: a hung judge does not block interpreter exit either.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from rollover.rollout.types import Group

Scorer = Callable[[Group], Any]  # fills Sample.reward (or returns the G rewards); may be async


class ScoringPool:
    """Runs blocking calls on daemon threads, at most `size` counted at once (the rest queue)."""

    def __init__(self, size: int = 4, name: str = "rollover-score") -> None:
        if size < 1:
            raise ValueError(f"scoring pool size must be >= 1, got {size}")
        self.size = size
        self.name = name
        self._lock = threading.Lock()
        self._queue: deque[tuple[Future, Callable[..., Any], tuple]] = deque()
        self._counted: set[Future] = set()  # running calls that hold a slot
        self._closed = False

    @property
    def busy(self) -> int:
        """Calls holding a slot now."""
        with self._lock:
            return len(self._counted)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue `fn(*args)`; the returned future holds its result or exception."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("scoring pool is closed")
            self._queue.append((future, fn, args))
            self._start_queued()
        return future

    def abandon(self, future: Future) -> None:
        """The caller stopped waiting for `future`: it keeps running but frees its slot."""
        with self._lock:
            if future in self._counted:
                self._counted.discard(future)
                self._start_queued()

    def close(self) -> None:
        """Cancel queued calls; running ones finish in the background."""
        with self._lock:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
        for future, _, _ in queued:
            future.cancel()

    def _start_queued(self) -> None:  # holds self._lock
        while self._queue and len(self._counted) < self.size:
            future, fn, args = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            self._counted.add(future)
            threading.Thread(target=self._work, args=(future, fn, args),
                             name=self.name, daemon=True).start()

    def _work(self, future: Future, fn: Callable[..., Any], args: tuple) -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            self.abandon(future)  # the slot goes back (a no-op if it was abandoned already)


class KeptScores:
    """One scorer call per group uid, kept until its result is used (across steps)."""

    def __init__(self, scorer: Scorer, pool: ScoringPool) -> None:
        self.scorer = scorer
        self.pool = pool
        self._calls: dict[int, tuple[Any, Group]] = {}  # uid -> (future or task, scored copy)
        self.calls_started = 0

    def __contains__(self, uid: int) -> bool:
        return uid in self._calls

    def forget(self, uid: int) -> None:
        """Drop a kept call (its group left: returned or dropped)."""
        self._calls.pop(uid, None)

    def _start(self, group: Group) -> tuple[Any, Group]:
        copy = group.clone()
        self.calls_started += 1
        if inspect.iscoroutinefunction(self.scorer):
            return asyncio.ensure_future(self.scorer(copy)), copy
        return self.pool.submit(self.scorer, copy), copy

    def _usable(self, call: Any) -> bool:
        """A call from an event loop that is gone (and unfinished) can never complete."""
        if call.cancelled():
            return False
        if isinstance(call, Future):
            return True
        return call.done() or call.get_loop() is asyncio.get_running_loop()

    async def score(self, group: Group) -> None:
        """Fill the group's rewards (and text) from the scorer; at most one call per uid.

        Cancelled while waiting: the call keeps running and stays kept for the next attempt.
        Failed: the call is forgotten (a retry calls the scorer again) and the error raised.
        """
        entry = self._calls.get(group.uid)
        if entry is None or not self._usable(entry[0]):
            entry = self._calls[group.uid] = self._start(group)
        call, copy = entry
        waitable = asyncio.wrap_future(call) if isinstance(call, Future) else call
        try:
            returned = await asyncio.shield(waitable)
        except asyncio.CancelledError:
            if isinstance(call, Future):
                self.pool.abandon(call)
            raise
        except BaseException:
            self._calls.pop(group.uid, None)
            raise
        self._calls.pop(group.uid, None)
        rewards = list(returned) if returned is not None else [s.reward for s in copy.samples]
        if len(rewards) != len(group.samples) or any(r is None for r in rewards):
            raise ValueError(f"scorer left rewards unset for group {group.uid}: {rewards}")
        for s, c, r in zip(group.samples, copy.samples, rewards):
            s.reward = float(r)
            s.text = c.text  # a scorer may re-decode the text its own way
