"""Where a CPU engine runs its model: in vLLM's engine-core process, not in a worker process of its own.

vLLM's `AsyncLLM` always runs its engine core (scheduler, KV cache manager) in a spawned process.
With one worker, vLLM's default executor ('uni') runs the model in that same process, as it does
on a GPU. Its CPU platform replaces 'uni' with the multiprocess executor ('mp'), because 'uni'
is also what runs a model in the *caller's* process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), whose
OpenMP runtime started long ago and can no longer be bound to cores; 'mp' spawns a worker and
sets its OpenMP variables first. Here the engine core is itself a fresh spawn, so its OpenMP
variables can be set the same way before it starts, and the worker process buys nothing. It
costs: a third Python process to import torch and vLLM at every engine start (measured here:
engine start ~25-35 s -> ~11-17 s), and a shared-memory queue hop from the core to the worker and
back on every decode step, whose readers spin or lose wake-ups (rollout/vllm_plugin.py).

So a one-worker CPU engine gets the 'uni' executor as a class (the platform's check compares
the string 'uni' and leaves a class alone), with the cores named by `VLLM_CPU_OMP_THREADS_BIND`
(`rollout.engine_cpus`, or a Ray actor's share) set for its engine core. `ROLLOVER_CPU_EXECUTOR=mp`
keeps vLLM's own choice (benchmarks compare the two); a tensor-parallel engine or an explicit
`distributed_executor_backend` is left alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from rollover.rollout.config import parse_cpu_list

EXECUTOR_ENV = "ROLLOVER_CPU_EXECUTOR"  # "mp": vLLM's worker process; unset or "engine_core": ours
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's: "auto", "nobind", or cores per rank ("0-3|4-7")


def engine_core_executor(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The AsyncEngineArgs that run a CPU engine's model in its engine core, and the environment
    its engine core must be spawned with (the cores `VLLM_CPU_OMP_THREADS_BIND` names); ({}, {})
    leaves vLLM's choice."""
    if os.environ.get(EXECUTOR_ENV, "engine_core") == "mp":
        return {}, {}
    if "distributed_executor_backend" in extra or int(extra.get("tensor_parallel_size", 1)) > 1:
        return {}, {}
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return {"distributed_executor_backend": UniProcExecutor}, openmp_environment(os.environ.get(BIND_ENV))


def openmp_environment(bind: str | None) -> dict[str, str]:
    """OpenMP variables that put a process's threads on the cores `bind` names (vLLM's format).

    The same variables vLLM's mp executor gives its worker: one thread per core, all bound to
    those cores. 'auto' or unset: as vLLM's auto binding for one worker, every core this process
    may use but the last (kept for the engine core's scheduler there, for the trainer here);
    'nobind': none."""
    if bind == "nobind":
        return {}
    if not bind or bind == "auto":
        available = sorted(os.sched_getaffinity(0))
        cores = available[:-1] or available
    else:
        cores = sorted(parse_cpu_list(bind.split("|")[0]))
    return {"OMP_NUM_THREADS": str(len(cores)), "OMP_PLACES": "{" + ",".join(map(str, cores)) + "}",
            "OMP_PROC_BIND": "true"}


_spawning = threading.Lock()  # two engines starting in one process must not mix their variables


@contextlib.contextmanager
def spawned_with(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in the environment while processes are spawned, then restore what was there."""
    with _spawning:
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
