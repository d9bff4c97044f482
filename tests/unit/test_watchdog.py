"""The watchdog stops a SIGKILLed parent's leftover processes (real processes, no engine).

The fake rl-train below starts children the way vLLM does (multiprocessing *spawn*: fork + exec;
the child starts a grandchild, as EngineCore starts its Worker), then sleeps until killed.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

FAKE_RUN = textwrap.dedent("""
    import multiprocessing as mp, os, signal, sys, time
    from pathlib import Path

    def grandchild():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # needs the SIGKILL round
        time.sleep(600)

    def engine():
        mp.get_context("spawn").Process(target=grandchild).start()
        time.sleep(600)

    if __name__ == "__main__":
        mode = sys.argv[1]
        if mode != "unwatched":
            from rollover.trainer.runtime import watchdog
            watchdog.start()
        child = mp.get_context("spawn").Process(target=engine)
        child.start()
        Path(sys.argv[2], f"rollover-weights-{os.getpid()}-x.safetensors").write_bytes(b"w")
        while len(__import__("psutil").Process().children(recursive=True)) < (3 if mode == "unwatched" else 4):
            time.sleep(0.05)
        print("ready", flush=True)
        if mode == "clean":
            for p in __import__("psutil").Process().children(recursive=True):
                if p.pid != watchdog._watchdog_pid:
                    p.kill()
            watchdog.clean_end()
            sys.exit(0)
        time.sleep(600)
""")


def start_fake(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the watchdog also looks in the temp dir
    proc = subprocess.Popen([sys.executable, str(script), mode, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    time.sleep(0.5)  # at least one watchdog scan after the last child started
    return proc, psutil.Process(proc.pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(procs)


def test_without_a_watchdog_a_sigkilled_parent_leaves_its_children(tmp_path):
    proc, children = start_fake(tmp_path, "unwatched")
    proc.kill()
    proc.wait()
    try:
        # The orphan problem the watchdog solves: engine, grandchild and resource tracker live on.
        assert len(wait_gone(children, 3.0)) == 3
    finally:
        for p in alive(children):
            p.kill()


def test_a_sigkilled_parent_leaves_nothing_running(tmp_path):
    proc, children = start_fake(tmp_path, "watched")
    assert len(children) == 4  # watchdog, engine, its grandchild, multiprocessing's resource tracker
    weights = tmp_path / f"rollover-weights-{proc.pid}-x.safetensors"
    assert weights.exists()
    started = time.monotonic()
    proc.kill()
    proc.wait()
    left = wait_gone(children, 10.0)
    assert not left, [p.cmdline() for p in left]
    # SIGTERM, then SIGKILL for the grandchild that ignores SIGTERM after the 2 s grace.
    assert time.monotonic() - started < 8.0
    assert not weights.exists()
    message = proc.stderr.read()
    assert "ended without shutting down; its watchdog stopped" in message


def test_a_clean_exit_gets_no_message(tmp_path):
    proc, children = start_fake(tmp_path, "clean")
    assert proc.wait(timeout=10) == 0
    assert not wait_gone(children, 10.0)
    assert proc.stderr.read() == ""
