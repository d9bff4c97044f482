"""`cluster:` resolved into engine settings and a weight backend (no Ray, no engine)."""

from __future__ import annotations

import pytest

from rollover.rollout.cluster import ClusterError, engine_settings, weight_backend
from rollover.rollout.settings import EngineSettings
from rollover.rollout.config import ClusterConfig


@pytest.mark.parametrize("given, has_cuda, expected", [
    ({}, False, "shared_memory"),
    ({}, True, "ipc"),  # one in-process engine on the trainer's GPU
    ({"address": "local", "engines": 2, "placement": "colocated", "trainer_num_gpus": 1}, True, "ipc"),
    ({"address": "local", "engines": 2}, True, "nccl"),  # disaggregated: engines on other GPUs
    ({"address": "auto", "weight_transfer": "shared_memory"}, True, "shared_memory"),
])
def test_auto_picks_the_backend_the_placement_needs(given, has_cuda, expected):
    assert weight_backend(ClusterConfig(**given), has_cuda) == expected


@pytest.mark.parametrize("backend", ["ipc", "nccl"])
def test_a_gpu_backend_without_cuda_is_one_line(backend):
    with pytest.raises(ClusterError, match=f"cluster.weight_transfer={backend} needs CUDA GPUs"):
        weight_backend(ClusterConfig(weight_transfer=backend), has_cuda=False)


def test_engine_settings_carry_tensor_parallelism_and_the_weight_transfer_config():
    from vllm.config import WeightTransferConfig

    base = EngineSettings(model="m", extra={"max_num_batched_tokens": 64})
    cluster = ClusterConfig(address="local", tensor_parallel_size=2, engine_num_gpus=2)
    settings = engine_settings(base, cluster, "nccl")
    assert settings.extra["tensor_parallel_size"] == 2 and settings.extra["max_num_batched_tokens"] == 64
    assert isinstance(settings.extra["weight_transfer_config"], WeightTransferConfig)
    assert settings.extra["weight_transfer_config"].backend == "nccl"
    assert engine_settings(base, ClusterConfig(), "shared_memory") == base  # today's path unchanged


def test_cpu_engines_on_one_machine_split_its_cores():
    from rollover.rollout.remote import cpu_share

    assert [cpu_share([0, 1], i, 2) for i in range(2)] == [[0], [1]]
    assert [cpu_share(list(range(8)), i, 2) for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [cpu_share([0, 1], i, 4) for i in range(4)] == [[0], [1], [0], [1]]  # more engines than cores
    assert cpu_share([0, 1, 2, 3], 0, 1) == []  # one engine: vLLM's own default binding
