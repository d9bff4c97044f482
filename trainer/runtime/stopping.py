"""Stopping on purpose: SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before
preemption) end a run at a safe point, with a checkpoint, one line, and exit 130 / 143.

A run goes through three phases, and a first signal does what is safe in each:
- starting (recipe checks, model load, engine start): nothing is worth saving yet, so the
  handler raises `StopRequested` at once (a BaseException, so no `except Exception` swallows it);
- training: the handler only records the signal. Awaits that may be cut short are wrapped in
  `stoppable()`: the rollout (the APRIL scheduler's step files every group into the buffer when
  cancelled, so the state is again "between steps") and evaluation. A stop cancels them and
  raises `StopAtSafePoint`; the update, the weight sync and a checkpoint write are never cut:
  the loop checks `stop_requested()` after them;
- finishing (summary, shutdown): the run completes.
A second signal exits at once (`os._exit`); the watchdog (trainer/runtime/watchdog.py) stops the engine.
Python runs a signal handler only when the main thread is back in the interpreter, and two
signals that arrive while it is inside one long C call (a backward pass, a weight load) run the
handler once. So signals are also counted where each one is seen: the C-level handler writes one
byte per signal to a wakeup fd (`signal.set_wakeup_fd`), and a thread reading it exits on the
second, whatever the main thread is doing.

The engine is started with SIGINT blocked (`call_with_sigint_blocked`), so its processes, which
inherit the mask, ignore the Ctrl-C a terminal sends to the whole process group and keep serving
until rl-train has stopped cleanly; vLLM's own shutdown uses SIGTERM, which stays deliverable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


class StopRequested(BaseException):
    """A signal arrived before training started: unwind now; nothing is saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopAtSafePoint(Exception):
    """A stop cut a rollout or an evaluation short; the trainer's state is between steps."""


class RunStopped(Exception):
    """Training stopped on a signal at step `step`, its state saved in `checkpoint`."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped at step {step}")
        self.step, self.checkpoint = step, checkpoint


class GracefulStop:
    """The process's SIGINT/SIGTERM handling (see the module doc); `install()` it once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase = "starting"  # then "training", then "finishing" (see the module doc)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._region: asyncio.Task | None = None  # the task awaiting a stoppable coroutine
        self._cancelled: asyncio.Task | None = None
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int, int] | None = None  # (read fd, write fd, previous wakeup fd)
        self._exiting = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> "GracefulStop":
        global _current
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._count_signals_as_they_arrive()
        _current = self
        return self

    def _count_signals_as_they_arrive(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C handler must never block
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._wakeup = (read_fd, write_fd, previous)
        threading.Thread(target=self._watch, args=(read_fd,), name="second-signal",
                         daemon=True).start()

    def _watch(self, read_fd: int) -> None:
        seen = 0
        while data := os.read(read_fd, 64):  # b"" once uninstall() closes the write end
            for signum in data:
                seen += signum in SIGNALS
                if seen >= 2:
                    self._exit_now(signum)
        os.close(read_fd)

    def uninstall(self) -> None:
        global _current
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if self._wakeup is not None:
            _, write_fd, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write_fd)
            self._wakeup = None
        if _current is self:
            _current = None

    def _exit_now(self, signum: int) -> None:
        """The second signal: one line, and exit without unwinding (from either counter)."""
        if not self._exiting.acquire(blocking=False):
            return  # the other counter is already exiting
        try:
            from rollover.trainer.runtime import watchdog
            from rollover.trainer.runtime.console import error_line

            watchdog.clean_end()  # on purpose: it stops the engine without a message
            error_line(f"rl-train: second {signal.Signals(signum).name}: exiting now; the last "
                       f"complete checkpoint is kept")
        except Exception:  # noqa: BLE001 - e.g. the console was mid-write: exit all the same
            pass
        os._exit(exit_code(signum))

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self._exit_now(signum)
            return
        self.signum = signum
        if self.phase == "starting":
            raise StopRequested(signum)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._cancel_region)
            except RuntimeError:  # the loop is closed: nothing to cancel
                pass

    def _cancel_region(self) -> None:
        if self._region is not None and not self._region.done():
            self._cancelled = self._region
            self._region.cancel()

    async def stoppable(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`; a stop (now or meanwhile) raises StopAtSafePoint instead.

        Only for work whose cancellation leaves the trainer between steps: the scheduler files
        every group before any error leaves its step, so any exception during a stop counts.
        """
        if self.requested:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise StopAtSafePoint(self.name)
        task = asyncio.current_task()
        self._loop, self._region = asyncio.get_running_loop(), task
        try:
            return await awaitable
        except BaseException as exc:
            if not self.requested or not isinstance(exc, Exception | asyncio.CancelledError):
                raise
            if self._cancelled is task:
                task.uncancel()
                self._cancelled = None
            raise StopAtSafePoint(self.name) from None
        finally:
            self._region = None


_current: GracefulStop | None = None


def _forget_wakeup_fd() -> None:
    """In a forked child: its signals must not be counted by the parent's watcher thread."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread of the main interpreter: nothing was inherited
        pass


os.register_at_fork(after_in_child=_forget_wakeup_fd)


def current() -> GracefulStop | None:
    """The installed GracefulStop, if any (rl-train installs one; tests and library use may not)."""
    return _current


def stop_requested() -> bool:
    return _current is not None and _current.requested


async def stoppable(awaitable: Awaitable[T]) -> T:
    """`GracefulStop.stoppable` of the installed handler; a plain await when none is installed."""
    if _current is None:
        return await awaitable
    return await _current.stoppable(awaitable)


def call_with_sigint_blocked(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that blocks SIGINT, so the processes it starts inherit the block.

    The main thread waits in short joins, so a signal still reaches rl-train's handler at once
    (a StopRequested leaves `fn` to finish in its daemon thread; the watchdog stops its children).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        # Starting multiprocessing's resource tracker unblocks SIGINT and SIGTERM in the calling
        # thread (bpo-33613's mask dance): start it first, so the spawns below keep the block.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="engine-start", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
