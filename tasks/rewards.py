"""Reward functions with TRL's signature, weighted and run under a timeout.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`, where the
columns are the task records' fields (question, answer, spec, ...). `None` means "does not
apply" and contributes nothing. A function that raises or exceeds its timeout scores its
samples as failed (0) and is counted; it never crashes the run.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import math
from collections import Counter
from typing import Any, Callable

from rollover.tasks.registry import Task, TaskError

RewardFn = Callable[..., list[float | None]]


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
    """Scores batches of completions with weighted reward functions, each under a timeout."""

    def __init__(self, fns: list[tuple[str, RewardFn, float]], timeout: float):
        self.fns, self.timeout = fns, timeout
        self.failures: Counter[str] = Counter()  # samples scored as failed, per function
        self._pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")

    @classmethod
    def from_config(cls, task_cfg, task: Task) -> "RewardRunner":
        fns = [(spec.fn, resolve_reward(spec.fn, task), spec.weight) for spec in task_cfg.rewards]
        return cls(fns, task_cfg.reward_timeout)

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

    def _call(self, name, fn, prompts, completions, columns) -> list[float | None]:
        future = self._pool.submit(fn, prompts, completions, **columns)
        try:
            values = future.result(timeout=self.timeout)
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
            return [None if v is None else _finite(float(v)) for v in values]
        except Exception:  # noqa: BLE001 - any failure of user code is scored, never raised
            future.cancel()
            self.failures[name] += len(completions)
            return [0.0] * len(completions)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("non-finite reward")
    return value
