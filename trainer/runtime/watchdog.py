"""A watchdog process that stops rl-train's leftover processes once rl-train is gone, even by SIGKILL.

Why: vLLM runs its engine in child processes (`VLLM::EngineCore`, which starts `VLLM::Worker`)
started with multiprocessing's *spawn* (fork + exec; vLLM forces it on CPU and once CUDA is up).
vLLM's workers watch EngineCore through a pipe, but EngineCore watches nobody: a SIGKILLed rl-train
left it running with parent 1, holding its memory (and, through it, multiprocessing's resource
tracker). A parent-death signal (`prctl(PR_SET_PDEATHSIG)`) cannot be set on a spawned child from
Python (no hook runs between its fork and its exec; `os.register_at_fork` covers `os.fork` only),
and killing rl-train's process group would also hit the shell or script that started it.

So rl-train starts this small process first (in its own session: a terminal's Ctrl-C does not
reach it) and keeps the write end of a pipe. The watchdog records rl-train's descendants every
`SCAN_S` seconds; when the pipe reaches end-of-file (rl-train exited, however it died) it sends
SIGTERM to those still alive and SIGKILL after `GRACE_S`, sparing multiprocessing's resource
tracker until the others are gone (it then exits by itself and unlinks the shared memory they
leaked), and deletes the weight files rl-train left in shared memory. After a clean exit it finds
nothing left and exits silently. Measured here: 15 MB of memory and 1% of one core (a ~2 ms scan
five times a second, with ~80 processes on the machine).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

SCAN_S = 0.2  # how often rl-train's descendants are recorded
GRACE_S = 2.0  # SIGTERM -> SIGKILL
CLEAN_END = b"done"
# rollout/weights/weight_sync.py names its shared-memory weight files rollover-weights-<pid>-<uuid>.safetensors.
WEIGHTS_FILES = "rollover-weights-{pid}-*.safetensors"

_write_fd: int | None = None  # rl-train's end of the pipe
_watchdog_pid: int | None = None


def _close_in_fork_child() -> None:
    """A child forked without exec (exec closes it: the fd is non-inheritable) must not keep the
    pipe open, or rl-train's death would never reach the watchdog."""
    global _write_fd
    if _write_fd is not None:
        os.close(_write_fd)
        _write_fd = None


def start(stderr: IO[str] | None = None) -> subprocess.Popen:
    """Start a watchdog for this process, before the engine starts (see the module doc).

    `stderr`: where its one line goes (the terminal when rl-train captures fds 1 and 2).
    """
    global _write_fd, _watchdog_pid
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollover.trainer.runtime.watchdog", str(os.getpid()), str(read_fd)],
        pass_fds=(read_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        start_new_session=True)
    os.close(read_fd)
    if _write_fd is None:
        os.register_at_fork(after_in_child=_close_in_fork_child)
    else:
        os.close(_write_fd)  # a second run in this process: the old watchdog reaps what it saw
    _write_fd, _watchdog_pid = write_fd, proc.pid
    return proc


def clean_end() -> None:
    """Tell the watchdog this process is ending on purpose (what is left gets no message)."""
    if _write_fd is not None:
        os.write(_write_fd, CLEAN_END)


def stop_descendants() -> None:
    """Stop this process's descendants now (all but the watchdog), as the watchdog would.

    For an exit while the engine is half started: multiprocessing joins its children at exit.
    """
    import psutil

    _reap({p.pid: p for p in psutil.Process().children() if p.pid != _watchdog_pid})


def cmdline(proc) -> list[str]:
    """`proc`'s command line, or [] once it is gone."""
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


# ---- the watchdog process ---------------------------------------------------------------------


def _scan(parent, seen: dict, me: int) -> None:
    """Add the parent's current descendants to `seen` (pid -> psutil.Process)."""
    import psutil

    try:
        for child in parent.children(recursive=True):
            if child.pid != me and child.pid not in seen:
                seen[child.pid] = child
    except psutil.Error:
        pass


def _reap(seen: dict) -> list[str]:
    """Stop every recorded process still running (and its descendants); returns their names."""
    import psutil

    alive = {}
    for proc in seen.values():
        try:
            if proc.is_running():  # same pid *and* start time: never a recycled pid
                alive[proc.pid] = proc
                alive.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    names = []
    for proc in alive.values():
        try:
            names.append(proc.name())
            proc.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(list(alive.values()), timeout=GRACE_S)

    trackers = [p for p in left if "multiprocessing.resource_tracker" in " ".join(cmdline(p))]
    for batch in ([p for p in left if p not in trackers], trackers):
        for proc in batch:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if batch:
            _, left = psutil.wait_procs(left, timeout=GRACE_S)
    return names


def _remove_weight_files(pid: int) -> None:
    for folder in {Path("/dev/shm"), Path(tempfile.gettempdir())}:
        for path in folder.glob(WEIGHTS_FILES.format(pid=pid)) if folder.is_dir() else ():
            path.unlink(missing_ok=True)


def _parent_gone(parent_pid: int, within: float) -> bool:
    """Whether this process is reparented within `within` s (the pipe closes just before)."""
    deadline = time.monotonic() + within
    while os.getppid() == parent_pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def watch(parent_pid: int, fd: int) -> None:
    """Record the parent's descendants until the pipe closes; then stop what is left."""
    import psutil

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the parent's end matters
    me, seen, clean = os.getpid(), {}, False
    try:
        parent = psutil.Process(parent_pid)
    except psutil.Error:
        return
    while True:
        ready, _, _ = select.select([fd], [], [], SCAN_S)
        if ready:
            data = os.read(fd, 64)
            if not data:
                break
            clean = clean or CLEAN_END in data
        if os.getppid() != parent_pid:  # reparented: the parent is gone even if the pipe leaked
            break
        _scan(parent, seen, me)
    if clean and not _parent_gone(parent_pid, within=1.0):
        return  # closed on purpose by a live parent (a second run in one process): all is shut down
    names = _reap(seen)
    _remove_weight_files(parent_pid)
    if names and not clean:
        print(f"rl-train (pid {parent_pid}) ended without shutting down; its watchdog stopped "
              f"{len(names)} leftover processes ({', '.join(sorted(set(names)))})", file=sys.stderr)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
