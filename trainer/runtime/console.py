"""rl-train's console: rollover's own lines on the terminal, everything else in the run's log file.

vLLM's engine processes, C++ extensions (the NUMA binding note), Triton, transformers and W&B
write to the process's stdout and stderr file descriptors, many of them from child processes,
so filtering Python's streams cannot keep them off the console. `start_capture` keeps a
duplicate of the terminal's stderr for rollover's `console` and its one-line errors, and points
fds 1 and 2, which every child process inherits, at a file: a temporary one while the heavy
modules import, then `<run folder>/rl-train.log` once the run folder is claimed (`log_to`).
Python `logging` and `warnings` go to that file too; rollover's own warnings also reach the
console. With `--verbose` a thread copies everything to the console as well.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import TracebackType

from rich.console import Console

LOG_FILE = "rl-train.log"

# soft_wrap: lines are never cut at 80 columns when the console is a file or a pipe.
console = Console(stderr=True, soft_wrap=True)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _copy_fd(source: int, dest: int) -> None:
    """Append everything in file `source` to `dest`, without moving `source`'s offset."""
    offset = 0
    while block := os.pread(source, 1 << 20, offset):
        _write_all(dest, block)
        offset += len(block)


class _Capture:
    """The process's fds 1 and 2 captured into a file; the terminal's stderr kept for rollover."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.path: Path | None = None
        self.lock = threading.Lock()  # the verbose pump and `log_to` swap `target_fd` under it
        sys.stdout.flush()
        sys.stderr.flush()
        encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
        self.terminal = open(os.dup(2), "w", buffering=1, encoding=encoding, errors="replace")
        fd, name = tempfile.mkstemp(prefix="rl-train-", suffix=".log")
        os.unlink(name)  # output from before the run folder is known; copied into the log later
        self.target_fd = fd
        if verbose:
            read_fd, write_fd = os.pipe()
            self._point_fds(write_fd)
            os.close(write_fd)
            threading.Thread(target=self._pump, args=(read_fd,), name="rl-train-verbose",
                             daemon=True).start()
        else:
            self._point_fds(fd)

    @staticmethod
    def _point_fds(fd: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)

    def _pump(self, read_fd: int) -> None:
        """--verbose: copy what fds 1 and 2 receive into the log file and onto the console."""
        pending = b""
        while chunk := os.read(read_fd, 1 << 16):
            with self.lock:
                self.write_log(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                try:
                    console.out(line.decode(errors="replace"), highlight=False)
                except Exception:  # noqa: BLE001 - the pump must go on, or writers block on the pipe
                    pass

    def log_to(self, path: Path) -> None:
        """From now on capture into `path` (appended: a resumed run continues its log)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)  # read back by finish_capture
        header = f"==== rl-train pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n"
        sys.stdout.flush()
        sys.stderr.flush()
        with self.lock:
            _write_all(fd, header.encode())
            _copy_fd(self.target_fd, fd)
            old, self.target_fd, self.path = self.target_fd, fd, path
            if not self.verbose:
                self._point_fds(fd)
        os.close(old)

    def write_log(self, text: str | bytes) -> None:
        """Write `text` to the log file only."""
        try:
            _write_all(self.target_fd, text if isinstance(text, bytes) else text.encode(errors="replace"))
        except OSError:
            pass  # a log that cannot be written must not stop the run

    def to_terminal(self, text: str) -> None:
        self.terminal.write(text)
        self.terminal.flush()

    def excepthook(self, kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        """A traceback (a bug, not a user mistake) goes to the log file and the terminal."""
        text = "".join(traceback.format_exception(kind, exc, tb))
        self.write_log(text)
        self.to_terminal(text)


_capture: _Capture | None = None


class _LogFileHandler(logging.Handler):
    """Every log record into the log file; with --verbose on the console too (unless shown already)."""

    def __init__(self, capture: _Capture) -> None:
        super().__init__()
        self.capture = capture
        self.setFormatter(_StandardLevels("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            self.capture.write_log(line + "\n")
            if self.capture.verbose and not _ConsoleHandler.shows(record):
                console.out(line, highlight=False)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler never raises
            self.handleError(record)


# Level words fixed here, not read from `logging`: libraries rename levels process-wide (importing
# hivemind makes WARNING print as "WARN").
LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING",
               logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}


def level_name(levelno: int) -> str:
    """The standard name of a logging level, whatever other libraries renamed it to."""
    return LEVEL_NAMES.get(levelno) or logging.getLevelName(levelno)


class _StandardLevels(logging.Formatter):
    """A formatter whose `%(levelname)s` is the standard word (`level_name`)."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = level_name(record.levelno)
        return super().format(record)


class _ConsoleHandler(logging.Handler):
    """Rollover's own warnings and errors as console lines (`warning: reward f failed: ...`)."""

    @staticmethod
    def shows(record: logging.LogRecord) -> bool:
        return record.name.startswith("rollover") and record.levelno >= logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        if not self.shows(record):
            return
        try:
            style = "yellow" if record.levelno == logging.WARNING else "red"
            console.print(f"{level_name(record.levelno).lower()}: {record.getMessage()}", style=style,
                          markup=False, highlight=False)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _quiet_progress_bars() -> None:
    """transformers' "Loading weights" and "Writing model shards" bars carry no information here."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def start_capture(verbose: bool = False) -> None:
    """Capture fds 1 and 2 (and `logging`, `warnings`) for the rest of this process.

    Call before importing vLLM and torch: their import-time notices are captured too. Until
    `log_to` names the log file they are held in a temporary file. Meant for the rl-train
    process itself: fds stay captured until it exits, so that shutdown output is captured too.
    """
    global _capture
    if _capture is not None:
        return
    capture = _capture = _Capture(verbose)
    console.file = capture.terminal
    if capture.terminal.isatty() and not os.isatty(0):  # rich sizes itself from fds 0-2
        console.width = os.get_terminal_size(capture.terminal.fileno()).columns
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # the log keeps the order things happened in
    sys.excepthook = capture.excepthook
    logging.getLogger().addHandler(_LogFileHandler(capture))
    rollover = logging.getLogger("rollover")
    rollover.setLevel(logging.INFO)  # rollover's info lines are in the log file
    rollover.addHandler(_ConsoleHandler())
    logging.captureWarnings(True)
    _quiet_progress_bars()


def log_to(path: Path) -> None:
    """Capture into `path` from now on, with what was captured so far; no-op without a capture."""
    if _capture is not None:
        _capture.log_to(path)


def error_line(text: str) -> None:
    """One of rl-train's one-line errors: on the terminal's stderr, and in the log file."""
    if _capture is None:
        print(text, file=sys.stderr, flush=True)
        return
    _capture.write_log(text + "\n")
    _capture.to_terminal(text + "\n")


def finish_capture(failed: bool) -> None:
    """At exit: a failed run whose folder was removed (it never started) keeps its log in /tmp."""
    capture = _capture
    if capture is None or not failed or capture.verbose or capture.path is None or capture.path.exists():
        return
    kept = Path(tempfile.gettempdir()) / f"rl-train-{os.getpid()}.log"
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _copy_fd(capture.target_fd, fd)
    finally:
        os.close(fd)
    error_line(f"rl-train: the run never started, so its folder was removed; its log is in {kept}")
