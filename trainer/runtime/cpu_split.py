"""How a CPU-only host splits its cores between the engine and the trainer (`rollout.engine_cpus`).

vLLM's CPU worker binds its threads to a core list (`VLLM_CPU_OMP_THREADS_BIND`; by default all
cores but one). The trainer (torch with `train.cpu_threads`, one by default) and the event loop
that streams the rollout then run on the cores the engine leaves. Naming the engine's cores
pins the trainer process to the rest, so with `rollout.max_async > 0` generation and updates
really run side by side instead of trading one core.
"""

from __future__ import annotations

import os

from rollover.rollout.config import parse_cpu_list


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
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(engine))
    return available - engine


def pin_trainer(cores: set[int]) -> None:
    """After the engine started: keep this process (trainer, event loop) on its own cores."""
    os.sched_setaffinity(0, cores)
