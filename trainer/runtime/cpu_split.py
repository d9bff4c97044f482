"""How a CPU-only host splits its cores between the engine and the trainer (`rollout.engine_cpus`).

vLLM's CPU worker binds its threads to a core list (`VLLM_CPU_OMP_THREADS_BIND`; by default all
cores but one). The trainer (torch with `train.cpu_threads` threads; `trainer_threads` picks them
when unset) and the event loop that streams the rollout then run on the cores the engine leaves.
Naming the engine's cores pins the trainer process to the rest, so with `rollout.max_async > 0`
generation and updates really run side by side instead of trading one core.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rollover.rollout.cpu_executor import BIND_ENV
from rollover.rollout.config import parse_cpu_list

if TYPE_CHECKING:
    from rollover.trainer.config import Recipe


def check_engine_cpus(text: str, available: set[int]) -> set[int]:
    """The engine's cores, refusing ones this process cannot use or a split that leaves none."""
    cores = parse_cpu_list(text)
    missing = cores - available
    if missing:
        raise ValueError(f"'{text}' names cores {sorted(missing)} this machine does not give us "
                         f"(available: {sorted(available)})")
    if not available - cores:
        raise ValueError(f"'{text}' leaves no core for the trainer (available: {sorted(available)})")
    return cores


def bind_engine(text: str) -> set[int]:
    """Before the engine starts: bind its worker to the cores in `text`; returns the trainer's."""
    available = os.sched_getaffinity(0)
    engine = check_engine_cpus(text, available)
    os.environ[BIND_ENV] = ",".join(str(c) for c in sorted(engine))
    return available - engine


def pin_trainer(cores: set[int]) -> None:
    """After the engine started: keep this process (trainer, event loop) on its own cores."""
    os.sched_setaffinity(0, cores)


def trainer_threads(cpu_threads: int | None, max_async: int, world_size: int,
                    available: set[int], engine_cpus: str | None) -> int:
    """Torch threads per trainer rank on a CPU-only host: `train.cpu_threads`, else chosen here.

    Without a split, rollout and update take turns when `max_async` is 0 (the engine's processes
    sleep while the trainer updates: rollout/vllm_plugin.py), so the update gets every core;
    pipelined, the engine generates beside the update on all cores but one, which is the
    trainer's. With `rollout.engine_cpus` the trainer has the cores the engine was not given.
    Ranks share what the trainer has. (Measured on the 2-core chat recipe: 1.02 s per update with
    2 threads against 1.65 s with 1.)"""
    if cpu_threads:
        return cpu_threads
    if engine_cpus:
        try:
            cores = len(available - check_engine_cpus(engine_cpus, available))
        except ValueError:
            cores = 1  # the run refuses the split with its own error before training
    else:
        cores = 1 if max_async > 0 else len(available)
    return max(1, cores // world_size)


def recipe_threads(recipe: "Recipe") -> int:
    """`trainer_threads` for this process under `recipe`."""
    return trainer_threads(recipe.train.cpu_threads, recipe.rollout.max_async, recipe.train.world_size,
                           os.sched_getaffinity(0), recipe.rollout.engine_cpus)
