"""The recipe's `rollout` and `cluster` sections: how rollouts are generated and where engines run.

Composed into the `Recipe` by trainer/config.py, which adds the checks across sections.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rollover.rollout.weights.weight_transfer import WeightBackend
from rollover.tasks.config import Section


def parse_cpu_list(text: str) -> set[int]:
    """`"1"`, `"2-5"`, `"0,2-3"` -> the core numbers; ValueError with one line otherwise."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"'{text}' is not a core list like '1', '2-5' or '0,2-3'")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"'{text}': range {part} runs backwards")
        cores.update(range(first, last + 1))
    return cores


class RolloutConfig(Section):
    groups_per_step: int = Field(8, ge=1)  # N: groups handed to the trainer each step
    group_size: int = Field(8, ge=1)  # G: samples per prompt
    # N'/N: groups kept in flight; `auto` chooses N' each step from the observed completion
    # lengths and the buffer (rollout/provision.py).
    over_provision: float | Literal["auto"] = 2.0
    partial: bool = True  # recycle unfinished generations into the next step
    max_staleness: int = Field(4, ge=0)  # drop groups with tokens older than this many versions
    # Steps the rollout may run ahead of the trainer: 0 = rollout, update, weight sync in turn;
    # k > 0 keeps generating while the trainer updates (at most k finished batches wait).
    max_async: int = Field(0, ge=0)
    # How a weight load meets in-flight requests when rollout runs ahead (max_async > 0):
    # `abort` stops them and resumes them from their token ids under the new weights; `keep`
    # freezes them in vLLM (pause mode keep) and lets them continue under the new weights.
    interrupt: Literal["abort", "keep"] = "abort"
    max_tokens: int = Field(64, ge=1)  # response token budget per sample
    # > 0: greedy sampling has no log-probs to train on; <= 2: vLLM refuses hotter sampling.
    temperature: float = Field(1.0, gt=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # < 1 only with algo.offpolicy: none (see Recipe)
    seed: int = 0
    # CPU build only: KV cache size in GiB (0.25 holds ~100k tokens of the built-in models; vLLM
    # fills it at every start, ~9 s per GiB here). Wins over the VLLM_CPU_KVCACHE_SPACE variable.
    kv_cache_gib: float = Field(0.25, gt=0)
    # CPU only: cores for the engine's worker ("1", "2-7"); the trainer is pinned to the rest.
    # None: vLLM's choice (all cores but one), the trainer unpinned (trainer/runtime/cpu_split.py).
    engine_cpus: str | None = None
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1.0)
    weight_bucket_mb: float = Field(512.0, gt=0)  # ipc weight loads stage this much on the GPU at a time
    enforce_eager: bool | None = None  # None: CUDA graphs on a GPU, eager on CPU
    # Colocated trainer on one GPU: the engine sleeps (frees its weights and KV cache) during
    # the update and wakes for the next rollout. CUDA only.
    sleep_mode: bool = False
    # A step stops with one line once the filter rejects this many groups (None: 50 x N').
    max_rejections_per_step: int | None = Field(None, ge=1)
    # Deadline of each weight load and of its check (rollout/weights/weight_check.py), every engine
    # included: a load past it stops the run in one line, naming the last intact checkpoint.
    weight_load_timeout_s: float = Field(600.0, gt=0)

    @field_validator("over_provision", mode="before")
    @classmethod
    def _over_provision(cls, value: Any) -> float | str:
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number >= 1.0:
            raise ValueError("must be a number >= 1 (N'/N groups in flight) or 'auto'")
        return number

    @field_validator("engine_cpus", mode="before")
    @classmethod
    def _engine_cpus(cls, value: Any) -> str | None:
        if value is None:
            return None
        parse_cpu_list(str(value))  # YAML reads `1` as a number
        return str(value)

    @model_validator(mode="after")
    def _check_async(self) -> "RolloutConfig":
        if self.max_async > self.max_staleness:
            # A batch produced k steps ahead is trained k versions later: its newest tokens
            # would already be too stale to train on.
            raise ValueError(f"max_async={self.max_async} exceeds max_staleness={self.max_staleness}: "
                             "tokens generated ahead would be dropped as stale")
        if self.max_async > 0 and self.sleep_mode:
            raise ValueError("max_async > 0 needs sleep_mode: false (the engine keeps generating "
                             "while the trainer updates)")
        if self.max_async > 0 and not self.partial:
            raise ValueError("max_async > 0 needs partial: true (a weight load interrupts "
                             "generations, which must resume)")
        return self


class ClusterConfig(Section):
    """Rollout engines on Ray (rollout/cluster.py): none runs today's one in-process engine."""

    address: Literal["local", "auto"] | None = None  # local: start Ray here; auto: join `ray start --head`
    engines: int = Field(1, ge=1, le=1024)
    engine_num_cpus: float = Field(1.0, ge=0.0)
    engine_num_gpus: float = Field(0.0, ge=0.0)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    placement: Literal["colocated", "disaggregated"] = "disaggregated"
    trainer_num_gpus: float = Field(0.0, ge=0.0)
    # How trainer weights reach the engines: auto is shared_memory without CUDA, ipc for an
    # engine on the trainer's GPU (in-process or colocated), nccl for engines on other GPUs.
    weight_transfer: Literal["auto", WeightBackend] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ClusterConfig":
        if self.address is None and self.engines > 1:
            raise ValueError(f"cluster.engines={self.engines} needs Ray: set cluster.address to "
                             "local (start Ray on this machine) or auto (join `ray start --head`)")
        if self.tensor_parallel_size > 1 and self.engine_num_gpus < self.tensor_parallel_size:
            raise ValueError(f"cluster.tensor_parallel_size={self.tensor_parallel_size} needs "
                             f"cluster.engine_num_gpus >= {self.tensor_parallel_size} (one GPU per shard)")
        if self.placement == "colocated" and self.engine_num_gpus and not self.trainer_num_gpus:
            raise ValueError("cluster.placement: colocated shares the trainer's GPUs with the "
                             "engines: set cluster.trainer_num_gpus")
        return self
