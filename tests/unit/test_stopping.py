"""SIGINT/SIGTERM handling with real signals to this process, against the fake engine.

A stop in the middle of a rollout must leave the scheduler between steps: every group filed
(in the buffer, with the tokens streamed so far), nothing in flight, conservation intact.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_buffer import FakeEngine, _config, _score, _stop_by_uid
from test_scheduler_failures import LoggedSource, assert_conserved

from rollover.rollout.april import AprilScheduler
from rollover.trainer.runtime.stopping import (
    GracefulStop,
    StopAtSafePoint,
    StopRequested,
    call_with_sigint_blocked,
    exit_code,
    stoppable,
)


@pytest.fixture
def stop():
    handler = GracefulStop().install()
    yield handler
    handler.uninstall()


def slow_scheduler():
    lengths = {u: 10_000 for u in range(100)}  # nothing finishes: the stop lands mid-rollout
    engine = FakeEngine(_stop_by_uid(lengths), tick=0.002, max_model_len=10_000)
    source = LoggedSource(lengths)
    return engine, source, AprilScheduler(engine, _config(max_tokens=5000), source, _score)


def test_a_signal_mid_rollout_files_every_group_and_stops_at_a_safe_point(stop):
    stop.phase = "training"
    engine, source, sched = slow_scheduler()

    async def main():
        asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGINT)
        with pytest.raises(StopAtSafePoint):
            await stoppable(sched.step())
        await asyncio.sleep(0.01)  # the task was un-cancelled: it goes on normally
        return asyncio.current_task().cancelling()

    assert asyncio.run(asyncio.wait_for(main(), 10)) == 0
    assert stop.signum == signal.SIGINT and exit_code(stop.signum) == 130
    assert_conserved(sched, source, returned=[])
    groups = sched.buffer.groups()
    assert len(groups) == sched.n_in_flight == 6  # every group that was in flight
    assert all(s.response_ids and not s.finished for g in groups for s in g.samples)
    assert not engine._open and sched.steps == 0
    sched.check_conservation()
    sched.close()


def test_a_stop_during_synchronous_work_waits_for_the_next_safe_point(stop):
    stop.phase = "training"
    engine, source, sched = slow_scheduler()
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while no stoppable await runs (an update)
    time.sleep(0.01)
    assert stop.requested and stop.name == "SIGTERM"

    async def main():
        await stoppable(sched.step())

    with pytest.raises(StopAtSafePoint):
        asyncio.run(main())
    assert source.drawn == []  # the next rollout never started
    sched.close()


def test_a_signal_while_starting_unwinds_at_once(stop):
    with pytest.raises(StopRequested) as raised:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
    assert raised.value.signum == signal.SIGTERM and exit_code(raised.value.signum) == 143


def _blocked_signals(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


def _sleep() -> None:
    time.sleep(30)


def test_processes_started_with_sigint_blocked_ignore_a_terminal_ctrl_c():
    """vLLM starts its engine with multiprocessing spawn (fork + exec): the mask survives both."""
    child = call_with_sigint_blocked(lambda: mp.get_context("spawn").Process(target=_sleep))
    call_with_sigint_blocked(child.start)
    try:
        sigint = 1 << (signal.SIGINT - 1)
        assert _blocked_signals(child.pid) & sigint
        assert not _blocked_signals(os.getpid()) & sigint  # this thread still takes Ctrl-C
        os.kill(child.pid, signal.SIGINT)
        child.join(0.5)
        assert child.is_alive()
    finally:
        child.kill()
        child.join()


def _script(body: str) -> subprocess.CompletedProcess:
    """Run `body` in a fresh Python with rl-train's handler installed and training under way."""
    prelude = ("import hashlib, os, signal, sys, time\n"
               "from rollover.trainer.runtime.stopping import GracefulStop\n"
               "stop = GracefulStop().install()\n"
               "stop.phase = 'training'\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=300)


def test_a_second_signal_exits_at_once_even_inside_a_long_c_call():
    # Both signals land while the main thread is in one C call (as in a backward pass): Python
    # runs its handler once afterwards, so only the wakeup-fd counter can see two.
    done = _script("""
        if os.fork() == 0:  # another process sends the two signals, as a terminal does
            time.sleep(0.3)
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(0.1)
            os.kill(os.getppid(), signal.SIGINT)
            os._exit(0)
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 200_000_000)  # seconds in C, the GIL released
        print("the long call finished", flush=True)
    """)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "the long call finished" not in done.stdout
    assert "rl-train: second SIGINT: exiting now" in done.stderr


def test_a_forked_childs_signal_does_not_count_as_the_parents_second():
    done = _script("""
        pid = os.fork()
        if pid == 0:  # the child inherits the handler: its own Ctrl-C is its own business
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os._exit(0)
        os.waitpid(pid, 0)
        os.kill(os.getpid(), signal.SIGINT)  # the parent's first signal: a graceful stop
        time.sleep(0.5)
        print("graceful", stop.requested, flush=True)
    """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "graceful True" in done.stdout
