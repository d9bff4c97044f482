"""How the rollout engine is built (`EngineSettings`) and how each request samples (`SamplingSettings`).

Kept apart from the engine wrapper so the recipe -> engine mapping (GPU-sane defaults, sleep
mode refused without CUDA) can be read and unit-tested without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rollover.rollout.config import RolloutConfig
from rollover.tasks.errors import UsageError

CPU_BLOCK_SIZE = 32  # see EngineSettings.block_size


class SleepModeUnavailable(UsageError, ValueError):
    """`rollout.sleep_mode: true` on a machine without CUDA."""


SLEEP_MODE_NEEDS_CUDA = (
    "rollout.sleep_mode: true needs a CUDA GPU (vLLM's sleep mode frees GPU memory for a "
    "colocated trainer); set rollout.sleep_mode: false on this machine"
)


@dataclass(frozen=True)
class EngineSettings:
    """How to build the engine; `from_rollout` maps the recipe's rollout section."""

    model: str
    dtype: str = "float32"
    max_model_len: int = 512
    seed: int = 0
    # CPU build: the KV cache, in GiB (fractions honoured). vLLM zero-fills it at start, ~9 s
    # per GiB on a 2-core machine, so the default is what a CPU run uses, not a GPU's share.
    kv_cache_gib: float = 0.25
    gpu_memory_utilization: float = 0.5  # GPU build
    # ipc weight loads stage at most this much of the weights on the engine's GPU at a time.
    weight_bucket_mb: float = 512.0
    enforce_eager: bool = True
    enable_prefix_caching: bool | None = None  # None: vLLM's default (on)
    # KV block size. A resumed request re-uses its cached KV only for *full* blocks, so small
    # blocks matter to APRIL: vLLM's CPU default (128) is longer than most short responses and
    # made no-tail APRIL ~35% slower here; None picks 32 on CPU and vLLM's default elsewhere.
    block_size: int | None = None
    # Behaviour log-probs of the distribution actually sampled (temperature, top-p applied).
    logprobs_mode: str = "processed_logprobs"
    max_num_seqs: int | None = None
    # vLLM sleep mode (CUDA only): `RolloutEngine.sleep()` frees the engine's GPU memory while
    # a colocated trainer updates, `wake_up()` takes it back.
    sleep_mode: bool = False
    # Deadline of every control call to an engine actor (abort, wait-idle, sleep, version, the
    # nccl relay's calls): one that passes it retires the engine (rollout.weight_load_timeout_s).
    weight_load_timeout_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs field

    @classmethod
    def from_rollout(cls, rollout_cfg: RolloutConfig, *, model: str, dtype: str, max_model_len: int,
                     has_cuda: bool, **overrides: Any) -> "EngineSettings":
        """Settings from the recipe's rollout section for a resolved model folder and dtype
        (trainer/build.py resolves them from the model section: the engine serves the trainer's
        compute dtype, `Policy.engine_weights` sends casts of the float32 masters in it).

        `has_cuda` decides the GPU-sane default: `enforce_eager: null` turns CUDA graphs on with
        a GPU, eager on CPU. `sleep_mode: true` without CUDA raises `SleepModeUnavailable`.
        """
        eager = rollout_cfg.enforce_eager
        values = dict(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=rollout_cfg.seed,
            kv_cache_gib=rollout_cfg.kv_cache_gib,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            weight_bucket_mb=rollout_cfg.weight_bucket_mb,
            enforce_eager=(not has_cuda) if eager is None else eager,
            sleep_mode=rollout_cfg.sleep_mode,
            weight_load_timeout_s=rollout_cfg.weight_load_timeout_s,
        )
        values.update(overrides)
        if values["sleep_mode"] and not has_cuda:
            raise SleepModeUnavailable(SLEEP_MODE_NEEDS_CUDA)
        return cls(**values)


@dataclass(frozen=True)
class SamplingSettings:
    """Per-request sampling knobs (the token budget is passed separately)."""

    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False  # benchmarks: force exact lengths
    seed: int | None = None
    # Tokens per streamed chunk. >1 wakes the caller less often (less frontend CPU); an abort
    # still delivers every token the engine produced, in the final chunk.
    stream_interval: int = 1
