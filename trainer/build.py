"""The composition root: objects of the lower packages built from the trainer's recipe.

rollout/, swarm/ and tasks/ never read the trainer's sections (docs/ARCHITECTURE.md,
"Layering"); what they need from them is resolved here and handed down.
"""

from __future__ import annotations

from typing import Any

from rollover.rollout.config import RolloutConfig
from rollover.rollout.settings import EngineSettings
from rollover.trainer.builtin.models import resolve_model_path
from rollover.trainer.config import ModelConfig, resolve_dtype


def engine_settings(model_cfg: ModelConfig, rollout_cfg: RolloutConfig, *, has_cuda: bool | None = None,
                    **overrides: Any) -> EngineSettings:
    """The engine's settings for the recipe's model and rollout sections: a `builtin:` path
    resolved to its folder, `dtype: auto` to the compute dtype (bfloat16 on CUDA, float32 on
    CPU; `has_cuda` default: detected), overrides (e.g. `model=` a checkpoint) applied last."""
    if has_cuda is None:
        import torch

        has_cuda = torch.cuda.is_available()
    resolved = dict(model=resolve_model_path(model_cfg.path), dtype=resolve_dtype(model_cfg.dtype, has_cuda),
                    max_model_len=model_cfg.max_model_len)
    return EngineSettings.from_rollout(rollout_cfg, has_cuda=has_cuda, **{**resolved, **overrides})
