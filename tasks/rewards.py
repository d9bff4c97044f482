"""Reward functions with TRL's signature, weighted, isolated, and failures made visible.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`, where the
columns are the task records' fields (question, answer, spec, ...). `None` means "does not
apply" and contributes nothing. A function that raises, returns the wrong number of values or
a non-finite one, or exceeds `task.reward_timeout`, scores its samples as failed (0); it never
crashes the scoring. User functions (`module:function`) run in worker processes (see
`reward_workers`), where an overrunning call is killed rather than abandoned.

Failures are visible: the first of each function logs one line with the exception; all are
counted per function (run total, and per step for the loop's metrics); and a function that
fails on every sample it scored for `task.max_reward_failure_steps` steps in a row is reported
by `stop_reason()`, since a reward that always scores 0 is a bug, not a signal.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from collections import Counter
from typing import Any, Callable

from rollover.tasks.registry import Task, TaskError
from rollover.tasks.reward_workers import RewardCallError, RewardWorkers

RewardFn = Callable[..., list[float | None]]
log = logging.getLogger(__name__)


def correctness_reward(task: Task) -> RewardFn:
    """The task's own verifier as a reward function (scores against the task's answer only)."""

    def correctness(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        # Callers such as TRL also pass non-column keywords (trainer_state, log_metric, ...).
        per_sample = {k: v for k, v in columns.items()
                      if isinstance(v, list) and len(v) == len(completions)}
        records = [dict(zip(per_sample, values)) for values in zip(*per_sample.values())]
        return [task.score(c, r) for c, r in zip(completions, records)]

    return correctness


def resolve_reward(name: str, task: Task) -> RewardFn:
    """`correctness`, or `package.module:function` importable from the Python path."""
    if name == "correctness":
        return correctness_reward(task)
    module_name, _, attr = name.partition(":")
    if not attr:
        raise TaskError(f"task.rewards: '{name}' is neither 'correctness' nor 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskError(f"task.rewards: cannot import '{name}' ({exc})") from None
    if not callable(fn):
        raise TaskError(f"task.rewards: '{name}' is not callable")
    return fn


class RewardRunner:
    """Scores batches of completions with weighted reward functions and accounts for failures.

    Functions that `workers` serves run there, under `timeout`; the others (the built-in
    verifier, functions given as objects) are called in the calling thread.
    """

    def __init__(self, fns: list[tuple[str, RewardFn, float]], timeout: float,
                 workers: RewardWorkers | None = None, max_failure_steps: int = 3):
        self.fns, self.timeout, self.workers = fns, timeout, workers
        self.max_failure_steps = max_failure_steps
        self.failures: Counter[str] = Counter()  # samples scored as failed, per function, whole run
        self.streaks: Counter[str] = Counter()  # consecutive steps a function failed on every sample
        self.last_error: dict[str, str] = {}
        self._lock = threading.Lock()
        self._step: dict[str, list[int]] = {}  # name -> [samples scored, failed] since the last report

    @classmethod
    def from_config(cls, task_cfg, task: Task) -> "RewardRunner":
        """The recipe's rewards; every name is resolved here, so a bad one fails before any engine."""
        fns = [(spec.fn, resolve_reward(spec.fn, task), spec.weight) for spec in task_cfg.rewards]
        # The task's verifier stays in-process only when its running time is bounded (the
        # arithmetic regex: ~7 us per 8-sample call; measured on 2 busy cores, a worker adds
        # ~30 us per call, ~0.2 ms with 4 scoring threads: cheap, but 4 processes for nothing).
        in_process = {"correctness"} if getattr(task, "bounded_score", False) else set()
        isolated = sorted({name for name, _, _ in fns} - in_process)
        scorer = getattr(task, "verifier", task)  # what correctness needs, without a dataset's rows
        workers = (RewardWorkers(isolated, task=scorer if "correctness" in isolated else None)
                   if isolated else None)
        return cls(fns, task_cfg.reward_timeout, workers, task_cfg.max_reward_failure_steps)

    def score(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
        """The weighted reward of each completion."""
        columns = {key: [r.get(key) for r in records] for key in records[0]} if records else {}
        totals = [0.0] * len(completions)
        for name, fn, weight in self.fns:
            values = self._call(name, fn, prompts, completions, columns)
            for i, value in enumerate(values):
                if value is not None:
                    totals[i] += weight * value
        return totals

    def _call(self, name: str, fn: RewardFn, prompts: list[str], completions: list[str],
              columns: dict[str, list]) -> list[float | None]:
        try:
            if self.workers is not None and name in self.workers.names:
                values = self.workers.call(name, prompts, completions, columns, self.timeout)
            else:
                values = fn(prompts, completions, **columns)
            checked = _checked(values, len(completions))
        except Exception as exc:  # noqa: BLE001 - any failure of user code is scored, never raised
            self._account(name, len(completions), _error_text(exc))
            return [0.0] * len(completions)
        self._account(name, len(completions), None)
        return checked

    def _account(self, name: str, samples: int, error: str | None) -> None:
        with self._lock:
            counts = self._step.setdefault(name, [0, 0])
            counts[0] += samples
            if error is None:
                return
            counts[1] += samples
            self.failures[name] += samples
            first = name not in self.last_error
            self.last_error[name] = error
        if first:
            log.warning("reward %s failed: %s (later failures are counted in reward_failures/%s)",
                        name, error, name)

    def take_step_report(self) -> dict[str, int]:
        """Failed samples per function since the last report (as `reward_failures/<fn>` metrics).

        Advances each function's streak of steps in which it failed on every sample it scored.
        """
        with self._lock:
            step, self._step = self._step, {}
        for name, (scored, failed) in step.items():
            if scored:
                self.streaks[name] = self.streaks[name] + 1 if failed == scored else 0
        return {f"reward_failures/{name}": step.get(name, [0, 0])[1] for name, _, _ in self.fns}

    def stop_reason(self) -> str | None:
        """Why the run must stop: a function failed on every sample for too many steps in a row."""
        for name, streak in self.streaks.items():
            if streak >= self.max_failure_steps:
                return (f"reward {name} failed on every sample for {streak} steps in a row "
                        f"(task.max_reward_failure_steps={self.max_failure_steps}); last error: "
                        f"{self.last_error.get(name, 'unknown')}")
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run continues counting from."""
        return {"failures": dict(self.failures), "streaks": dict(self.streaks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.failures.update(state.get("failures", {}))
        self.streaks.update(state.get("streaks", {}))

    def close(self) -> None:
        """Stop the worker processes (also done at interpreter exit)."""
        if self.workers is not None:
            self.workers.close()


def _error_text(exc: Exception) -> str:
    """One line: the exception's type and message (a worker's error already names its type)."""
    text = str(exc) if isinstance(exc, RewardCallError) else f"{type(exc).__name__}: {exc}"
    return (text.splitlines() or [""])[0]


def _checked(values: Any, count: int) -> list[float | None]:
    """`values` as `count` finite floats or None; raise on anything else."""
    values = list(values)
    if len(values) != count:
        raise ValueError(f"returned {len(values)} values for {count} completions")
    result = [None if v is None else float(v) for v in values]
    if not all(v is None or math.isfinite(v) for v in result):
        raise ValueError("non-finite reward")
    return result
