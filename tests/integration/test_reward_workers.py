"""Reward functions in worker processes: stopped at the timeout, replaced when dead, never left behind.

Real worker processes (spawned), real functions imported by name; no engine.
"""

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from rollover.rollout.scoring import ScoringPool
from rollover.tasks.registry import ArithmeticTask, TaskError
from rollover.tasks.reward_workers import RewardCallError, RewardWorkers
from rollover.tasks.rewards import RewardRunner
from rollover.tasks.config import TaskConfig

pytestmark = pytest.mark.integration
FNS = "tests.integration.reward_fns"
ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    """Not running (reaped, or a zombie its new parent has not reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _children() -> set[int]:
    """Running child processes (compare with a snapshot: the session's engine is one too)."""
    return {p.pid for p in psutil.Process().children() if not _gone(p.pid)}


def _trackers() -> set[int]:
    """multiprocessing's resource tracker: one per process, started with the first worker, kept."""
    found = set()
    for child in psutil.Process().children():
        try:
            if any("resource_tracker" in part for part in child.cmdline()):
                found.add(child.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def test_a_hung_reward_is_killed_and_never_delays_correctness():
    task = ArithmeticTask(seed=0, digits_min=2, digits_max=2, operands=2, scratchpad=True)
    cfg = TaskConfig(rewards=[{"fn": "correctness", "weight": 2.0}, {"fn": f"{FNS}:sleeps"}],
                     reward_timeout=1.0)
    before = _children()
    runner = RewardRunner.from_config(cfg, task)
    try:
        prestarted = set(runner.workers.pids())
        assert len(prestarted) == 4
        records = [task.record(i) for i in range(20)]
        # Even records get their own solution (correct), odd ones a wrong answer; by hand the
        # reward is 2 * correctness, since the hung judge scores 0 when it is stopped.
        completions = [r["solution"] if i % 2 == 0 else f"#{int(r['answer']) + 1}"
                       for i, r in enumerate(records)]
        expected = [2.0 if i % 2 == 0 else 0.0 for i in range(20)]
        pool = ScoringPool(size=4)  # the trainer's scoring threads
        started = time.monotonic()
        futures = [pool.submit(runner.score, ["p"] * 4, [c] * 4, [r] * 4)
                   for c, r in zip(completions, records)]
        results = [f.result(timeout=60) for f in futures]
        elapsed = time.monotonic() - started
        # 20 calls on 4 threads: five rounds of one 1 s timeout plus a replacement's start-up.
        # Abandoned in threads, the 30 s sleeps would hold all 4 threads for 150 s.
        assert elapsed < 20, elapsed
        assert results == [[e] * 4 for e in expected]
        assert runner.failures == {f"{FNS}:sleeps": 80}
        assert runner.workers.replaced == 20
        assert all(_gone(pid) for pid in prestarted)  # stopped, not left sleeping
        # No stray sleeper anywhere (multiprocessing's resource tracker may have started too).
        assert _children() - before - _trackers() == set(runner.workers.pids())
    finally:
        runner.close()


def test_one_slow_call_does_not_delay_another():
    before = _children()
    workers = RewardWorkers([f"{FNS}:sleeps", f"{FNS}:length"], prestart=2)
    outcome = {}

    def slow_call():
        try:
            workers.call(f"{FNS}:sleeps", ["p"], ["x"], {}, 5.0)
        except RewardCallError as exc:
            outcome["error"] = str(exc)

    try:
        with ThreadPoolExecutor(2) as both:  # two calls at once: both workers have started
            assert list(both.map(lambda c: workers.call(f"{FNS}:length", ["p"], [c], {}, 30),
                                 ["abc", "de"])) == [[3.0], [2.0]]
        slow = threading.Thread(target=slow_call)
        slow.start()
        time.sleep(0.3)  # the sleeper holds its worker now
        started = time.monotonic()
        assert workers.call(f"{FNS}:length", ["p", "p"], ["ab", "abcd"], {}, 5.0) == [2.0, 4.0]
        assert time.monotonic() - started < 2.0
        slow.join()
        assert outcome["error"] == "timed out after 5 s (task.reward_timeout); stopped"
    finally:
        workers.close()
    assert not _children() - before - _trackers()


def test_errors_and_deaths_are_reported_and_the_worker_replaced(caplog):
    caplog.set_level(logging.WARNING, logger="rollover.tasks.rewards")
    cfg = TaskConfig(rewards=[{"fn": f"{FNS}:divides_by_zero"}, {"fn": f"{FNS}:crashes"},
                              {"fn": f"{FNS}:pid"}])
    before = _children()
    runner = RewardRunner.from_config(cfg, ArithmeticTask(0, 1, 1, 2, True))
    try:
        records = [{"question": "q", "answer": "1"}] * 2
        worker_pids = set()
        for _ in range(3):
            totals = runner.score(["q", "q"], ["a", "b"], records)
            worker_pids.add(int(totals[0]))  # only the pid function succeeds
        assert all(pid != os.getpid() for pid in worker_pids)  # ran in workers, not here
        assert runner.failures == {f"{FNS}:divides_by_zero": 6, f"{FNS}:crashes": 6}
        assert runner.workers.replaced == 3  # one per crash; a raising function keeps its worker
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [
            f"reward {FNS}:divides_by_zero failed: ZeroDivisionError: division by zero "
            f"(later failures are counted in reward_failures/{FNS}:divides_by_zero)",
            f"reward {FNS}:crashes failed: reward worker died (exit code 3) "
            f"(later failures are counted in reward_failures/{FNS}:crashes)"]
    finally:
        runner.close()
    assert not _children() - before - _trackers()


def test_an_unimportable_reward_fails_in_the_parent_in_one_line():
    with pytest.raises(TaskError, match=f"cannot import '{FNS}:no_such_fn'"):
        RewardRunner.from_config(TaskConfig(rewards=[{"fn": f"{FNS}:no_such_fn"}]),
                                 ArithmeticTask(0, 1, 1, 2, True))


def test_workers_exit_when_their_parent_is_killed():
    script = ("from rollover.tasks.reward_workers import RewardWorkers\n"
              f"w = RewardWorkers(['{FNS}:length'], prestart=2)\n"
              f"for _ in range(2): w.call('{FNS}:length', ['p'], ['x'], {{}}, 30)\n"
              "print(*w.pids(), flush=True)\n"
              "import time; time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)


def test_a_dataset_tasks_verifier_runs_in_a_worker(tmp_path):
    # math-verify (sympy) has no time bound: the correctness reward goes to a worker that can be
    # killed, and gets the verifier only, not the dataset's rows.
    from rollover.tasks.registry import AnswerVerifier, DatasetTask

    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"question": "{i}+{i}?", "answer": {2 * i}}}\n' for i in range(4)))
    task = DatasetTask(str(path), "question", "answer", eval_size=1)
    runner = RewardRunner.from_config(TaskConfig(name="dataset", path=str(path)), task)
    try:
        assert runner.workers is not None and runner.workers.names == {"correctness"}
        assert isinstance(pickle.loads(runner.workers._args[1]), AnswerVerifier)
        record = task.record(0)  # "0+0?", answer "0"
        assert runner.score(["q"] * 2, ["so \\boxed{0}", "I think 7"], [record] * 2) == [1.0, 0.0]
        assert not runner.failures
    finally:
        runner.close()
