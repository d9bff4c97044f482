"""Reward functions run in worker processes, so a call past its timeout can be stopped.

A thread cannot be stopped: a reward call abandoned at its timeout keeps its thread, and a few
hung judges fill any thread pool (seen: a 30 s function under a 1 s timeout made every later call
time out, and one step took 241 s). A process can. `RewardWorkers` keeps one idle worker process
per concurrent call; a call takes a worker (or starts one), and a worker that overruns the
timeout is SIGKILLed and replaced, so one slow call never delays another.

Workers are started with 'spawn' (the parent runs vLLM threads; forking it is unsafe), get the
parent's `sys.path`, resolve their functions by name once, ignore Ctrl-C (the parent stops them),
and exit on their own when the parent process goes away, however it went.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

# A new worker imports rollover and the user's module before its first call; that time is not
# the call's, so it waits for it separately (generously: a user's module may import torch).
STARTUP_TIMEOUT_S = 120.0


class RewardCallError(RuntimeError):
    """A reward call that produced no values: raised, timed out, died, or could not start."""


def _watch_parent() -> None:
    """Exit when the process that started this worker is gone (SIGKILLed parents included)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="reward-worker-watch", daemon=True).start()


def _serve(conn: Connection, names: list[str], task_bytes: bytes | None) -> None:
    """A worker's life: resolve `names` once, then answer calls until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _watch_parent()
    from rollover.tasks.rewards import resolve_reward

    try:
        task = pickle.loads(task_bytes) if task_bytes is not None else None
        fns = {name: resolve_reward(name, task) for name in names}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which counts it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        name, prompts, completions, columns = request
        try:
            values = fns[name](prompts, completions, **columns)
            reply: tuple[str, Any] = ("ok", [None if v is None else float(v) for v in values])
        except BaseException as exc:  # noqa: BLE001 - user code: any failure is a scored failure
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, names: list[str], task_bytes: bytes | None):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child_conn, names, task_bytes),
                                   name="rollover-reward", daemon=False)  # user code may fork
        self.process.start()
        child_conn.close()
        self.ready = False

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has resolved its functions; raise if it cannot."""
        if self.ready:
            return
        if not self.conn.poll(timeout):
            raise RewardCallError(f"reward worker did not start within {timeout:g} s")
        status, detail = self.conn.recv()
        if status != "ready":
            raise RewardCallError(f"reward worker could not load its functions: {detail}")
        self.ready = True

    def stop(self) -> None:
        """SIGKILL and reap (a stuck call cannot be asked to stop)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def exit_text(self) -> str:
        self.process.join(1)
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


class RewardWorkers:
    """A thread-safe pool of reward worker processes, one per concurrent call.

    `names` are the reward functions the workers serve (`correctness` needs `task`, which is
    pickled to each worker). `prestart` workers start now, so start-up is paid once, up front.
    """

    def __init__(self, names: list[str], task: Any = None, prestart: int = 4,
                 startup_timeout: float = STARTUP_TIMEOUT_S):
        self.names = frozenset(names)
        self.startup_timeout = startup_timeout
        self.replaced = 0  # workers killed at a timeout or found dead, and replaced
        self._ctx = mp.get_context("spawn")
        self._args = (sorted(self.names), pickle.dumps(task) if task is not None else None)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # ready ones at the end: taken first
        self._live: set[_Worker] = set()
        self._closed = False
        for _ in range(prestart):
            self._idle.insert(0, self._start())
        atexit.register(self.close)

    def _start(self) -> _Worker:
        worker = _Worker(self._ctx, *self._args)
        with self._lock:
            self._live.add(worker)
        return worker

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RewardCallError("reward workers are closed")
            if self._idle:
                return self._idle.pop()
        return self._start()

    def _put_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.stop()

    def _replace(self, worker: _Worker) -> None:
        """Kill `worker` and start its successor now, so the next call need not wait for one."""
        worker.stop()
        with self._lock:
            self._live.discard(worker)
            self.replaced += 1
            if self._closed:
                return
        successor = self._start()
        with self._lock:
            if not self._closed:
                self._idle.insert(0, successor)
                return
        successor.stop()

    def call(self, name: str, prompts: list[str], completions: list[str], columns: dict[str, list],
             timeout: float) -> list[float | None]:
        """`name(prompts, completions, **columns)` in a worker; at most `timeout` s once started.

        Raises `RewardCallError` for any call that gives no values; a worker that overran the
        timeout, died, or cannot start is killed and replaced.
        """
        if name not in self.names:
            raise RewardCallError(f"reward workers do not serve '{name}'")
        worker = self._take()
        try:
            worker.wait_ready(self.startup_timeout)
            worker.conn.send((name, prompts, completions, columns))
            if not worker.conn.poll(timeout):
                raise RewardCallError(f"timed out after {timeout:g} s (task.reward_timeout); stopped")
            status, payload = worker.conn.recv()
        except RewardCallError:
            self._replace(worker)
            raise
        except (EOFError, OSError) as exc:
            self._replace(worker)
            raise RewardCallError(f"reward worker died ({worker.exit_text()})") from exc
        except BaseException:  # e.g. columns that cannot be pickled: start clean all the same
            self._replace(worker)
            raise
        self._put_back(worker)
        if status != "ok":
            raise RewardCallError(payload)
        return payload

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        with self._lock:
            return [w.process.pid for w in self._live if w.process.pid is not None]

    def close(self) -> None:
        """Stop every worker (idempotent; also runs at interpreter exit)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers, self._idle = list(self._live), []
            self._live.clear()
        atexit.unregister(self.close)
        for worker in workers:
            worker.stop()
