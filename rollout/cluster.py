"""The recipe's `cluster:` section made real: one in-process engine, or N engine actors on Ray.

`cluster.address` none keeps today's single in-process `RolloutEngine`. `local` starts Ray on
this machine; `auto` joins the cluster a `ray start --head` left running. Each engine is a Ray
actor (`rollout/remote.py`) with `engine_num_cpus` / `engine_num_gpus`; the actors start at the
same time (each start is ~20 s on CPU) and stand behind one `EnginePool`, which also rebuilds an
engine whose actor dies. `placement: colocated` puts every engine on the trainer's node (sharing
its GPUs, fractions allowed); `disaggregated` spreads them over the cluster's nodes.

Weights (`weight_backend`): shared memory without CUDA; ipc for an engine on the trainer's GPU
(the in-process engine, or colocated actors, which stage CUDA-IPC buckets on their GPU from the
object store's CPU copy); nccl for disaggregated engines, sent from this (the trainer's) process
as NCCL rank 0 straight to each engine's workers, the actors relaying only control calls
(rollout/remote.py, rollout/weights/nccl_sender.py, rollout/weights/weight_relay.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import uuid
from typing import Any

from rollover.rollout.cpu_executor import BIND_ENV
from rollover.rollout.config import ClusterConfig
from rollover.rollout.pool import EnginePool
from rollover.rollout.remote import RemoteEngine
from rollover.rollout.settings import EngineSettings
from rollover.tasks.errors import RolloverError


class ClusterError(RolloverError, RuntimeError):
    """Ray could not be started or joined, or an engine actor could not be placed or started."""


_released = threading.Event()  # set by disconnect(): the thread that started Ray may end


def connect(address: str, num_cpus: int | None = None) -> None:
    """Start (`local`) or join (`auto`) Ray once per process; ClusterError in one line.

    Ray is started from a thread that lives until `disconnect()`: Ray ties its processes to the
    life of the *thread* that started them (a parent-death signal), so starting it from a
    short-lived thread (like the engine-start one) killed Ray a minute later. That thread also
    blocks SIGINT, so a terminal's Ctrl-C reaches rl-train, not Ray's processes.
    """
    import ray

    if ray.is_initialized():
        return
    outcome: dict[str, BaseException] = {}
    ready = threading.Event()

    def own_ray() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            if address == "local":
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            outcome["error"] = exc
        ready.set()
        if "error" not in outcome:
            _released.wait()

    _released.clear()
    threading.Thread(target=own_ray, name="ray-owner", daemon=True).start()
    ready.wait()
    if "error" in outcome:  # e.g. no running cluster for `auto`
        exc = outcome["error"]
        first = (str(exc).splitlines() or [""])[0]
        raise ClusterError(f"cluster.address={address}: Ray did not start: {type(exc).__name__}: {first}") from exc


def weight_backend(cluster: ClusterConfig, has_cuda: bool) -> str:
    """`cluster.weight_transfer` with `auto` resolved; ClusterError for a GPU backend without CUDA."""
    backend = cluster.weight_transfer
    if backend == "auto":
        if not has_cuda:
            return "shared_memory"
        return "ipc" if cluster.address is None or cluster.placement == "colocated" else "nccl"
    if backend != "shared_memory" and not has_cuda:
        raise ClusterError(f"cluster.weight_transfer={backend} needs CUDA GPUs; use shared_memory "
                           "(or auto) on this machine")
    if backend == "nccl" and (cluster.address is None or cluster.placement == "colocated"):
        raise ClusterError("cluster.weight_transfer=nccl needs engines on GPUs other than the "
                           "trainer's (cluster.address set, placement: disaggregated); use ipc")
    return backend


def engine_settings(settings: EngineSettings, cluster: ClusterConfig, backend: str) -> EngineSettings:
    """The per-engine settings: tensor parallelism over the actor's GPUs, the weight backend."""
    from rollover.rollout.weights.weight_transfer import engine_args_for

    extra = {**settings.extra, **engine_args_for(backend)}
    if cluster.tensor_parallel_size > 1:
        extra["tensor_parallel_size"] = cluster.tensor_parallel_size
    return dataclasses.replace(settings, extra=extra)


def placement_strategy(placement: str) -> Any:
    """Where Ray puts engine actors: `colocated` on the trainer's (this driver's) node, hard;
    `disaggregated` spread over the cluster's nodes."""
    if placement == "disaggregated":
        return "SPREAD"
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


class EngineFactory:
    """Builds and starts engine actors for one run (and their replacements)."""

    def __init__(self, settings: EngineSettings, cluster: ClusterConfig, env: dict[str, str] | None = None,
                 backend: str = "shared_memory") -> None:
        self.settings = engine_settings(settings, cluster, backend)
        self.backend = backend
        self.cluster = cluster
        self.env = env or {}
        self.run_id = uuid.uuid4().hex[:8]
        self.built = 0

    async def start(self, index: int) -> RemoteEngine:
        """A started engine actor in slot `index`; ClusterError if it cannot start."""
        self.built += 1
        name = f"rollover-engine-{self.run_id}-{index}-{self.built}"
        strategy = {"scheduling_strategy": placement_strategy(self.cluster.placement)}
        engine = RemoteEngine.create(self.settings, name, num_cpus=self.cluster.engine_num_cpus,
                                     num_gpus=self.cluster.engine_num_gpus, env=self.env,
                                     backend=self.backend, slot=(index, self.cluster.engines), **strategy)
        try:
            return await engine.start()
        except Exception as exc:  # noqa: BLE001 - the actor's own error, in one line
            engine.shutdown()
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ClusterError(f"engine actor {index} did not start: {first}") from exc


def start_pool(settings: EngineSettings, cluster: ClusterConfig, env: dict[str, str] | None = None,
               backend: str = "shared_memory") -> EnginePool:
    """Connect to Ray and start `cluster.engines` engine actors behind one pool (blocking)."""
    connect(cluster.address)
    factory = EngineFactory(settings, cluster, env, backend)

    async def start_all() -> list[RemoteEngine]:
        started = await asyncio.gather(*(factory.start(i) for i in range(cluster.engines)),
                                       return_exceptions=True)
        failures = [e for e in started if isinstance(e, BaseException)]
        if failures:
            for engine in started:
                if isinstance(engine, RemoteEngine):
                    engine.shutdown()
            raise failures[0]
        return started

    engines = asyncio.run(start_all())
    return EnginePool(engines, replace=factory.start)


def start_engines(settings: EngineSettings, cluster: ClusterConfig) -> Any:
    """What the recipe's `cluster:` asks for, started: one `RolloutEngine`, or an `EnginePool`."""
    import torch

    from rollover.rollout.weights.weight_transfer import engine_side_transport

    backend = weight_backend(cluster, torch.cuda.is_available())
    if cluster.address is None:
        from rollover.rollout.engine import RolloutEngine

        return RolloutEngine(engine_settings(settings, cluster, backend),
                             engine_side_transport(backend, settings)).start()
    bind = os.environ.get(BIND_ENV)  # rollout.engine_cpus, for every engine
    return start_pool(settings, cluster, {BIND_ENV: bind} if bind else None, backend)


def disconnect() -> None:
    """Leave Ray (a `local` cluster stops with it); nothing when Ray never started."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    _released.set()
