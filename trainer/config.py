"""The recipe schema: one typed section per concern, keys named as in the code that uses them.

Each package owns its section (tasks/config.py, rollout/config.py, swarm/config.py); this module
holds the trainer's own (model, algo, train, LoRA, tracking), composes all of them into the
`Recipe` with the checks that span sections, and loads it. A recipe is YAML; `load_recipe` reads it, applies `key.sub=value` overrides and validates it.
Every user mistake becomes a `RecipeError` with one line naming the file and the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from rollover.algos.advantages import StdMode
from rollover.algos.losses import LossName, OffPolicy
from rollover.rollout.config import ClusterConfig, RolloutConfig
from rollover.swarm.config import SwarmConfig
from rollover.tasks.config import Section, TaskConfig
from rollover.tasks.errors import UsageError


class ModelConfig(Section):
    path: str = "builtin:tiny-math"  # a local folder, a hub id, or builtin:tiny-math
    # The compute dtype: forward passes (autocast), the engine's weights, the KL reference.
    # Trained weights and AdamW state are float32 whatever it is (trainer/policy.py).
    # auto: bfloat16 when CUDA is present, float32 otherwise (`resolve_dtype`).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False
    max_model_len: int = Field(512, ge=16)  # prompt + response tokens the engine must hold

    @field_validator("dtype", mode="before")
    @classmethod
    def _no_float16(cls, value: Any) -> Any:
        """float16 computes need loss scaling (small gradients underflow to zero), which the
        update step does not do; bfloat16 has float32's range and needs none."""
        if value == "float16":
            raise ValueError("float16 is not supported (no loss scaling: its small gradients underflow "
                             "to zero); use bfloat16 or float32")
        return value


class AlgoConfig(Section):
    loss: LossName = "grpo"
    # None: "none" for dr_grpo (the design drops the std term), "group" for every other loss.
    advantage_std: StdMode | None = None
    clip_low: float = Field(0.2, ge=0.0)
    clip_high: float = Field(0.2, ge=0.0)
    clip_c: float | None = Field(None, gt=1.0)  # dual clip for negative advantages
    kl_coef: float = Field(0.0, ge=0.0)
    offpolicy: OffPolicy = "tis"
    tis_cap: float = Field(2.0, ge=1.0)
    dynamic_sampling: bool = True  # reject groups whose rewards are all equal
    overlong_buffer: int = Field(0, ge=0)  # DAPO soft overlong window (tokens); 0 = off
    overlong_penalty: float = Field(1.0, ge=0.0)
    mask_truncated: bool = False
    dr_grpo_length: int | None = Field(None, ge=1)  # constant divisor; default rollout.max_tokens


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    # Must stay 0: the ratio pi_theta / pi_old needs both log-probs from the same function, so
    # the policy runs with dropout off (kept as a key so recipes from other tools fail clearly).
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("must be 0: old and new log-probs must come from the same forward "
                             "pass, so rollover runs the policy with dropout off")
        return value


class TrainConfig(Section):
    steps: int = Field(40, ge=1)
    lr: float = Field(2e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0)
    updates_per_batch: int = Field(1, ge=1)
    micro_batch_tokens: int = Field(4096, ge=1)
    eval_every: int = Field(10, ge=1)
    save_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    output_dir: str | None = None  # default: runs/<recipe>-<timestamp>
    resume: bool | str = False  # true: latest checkpoint in output_dir; or a checkpoint path
    seed: int = 0
    # Torch threads per trainer rank on a CPU-only host; unset: every core the trainer has when
    # rollout and update take turns (max_async 0), one when they overlap (trainer/runtime/cpu_split.py).
    cpu_threads: int | None = Field(None, ge=1)
    max_bad_steps: int = Field(3, ge=0)  # NaN/inf losses tolerated (skipped) before stopping
    # Data-parallel trainer ranks on this machine (FSDP2; trainer/distributed/): 1 is one process.
    world_size: int = Field(1, ge=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TrackingConfig(Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "rollover"
    run_name: str | None = None
    sample_table_rows: int = Field(4, ge=0)


class Recipe(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        local = self.swarm.local_groups
        if local is not None and local != self.rollout.groups_per_step:
            raise ValueError(f"swarm.local_groups={local} differs from rollout.groups_per_step="
                             f"{self.rollout.groups_per_step}: both are the local groups per step; "
                             "set one of them")
        if self.rollout.top_p < 1.0 and self.algo.offpolicy != "none":
            # The engine's behaviour log-probs are of the top-p-truncated distribution, the
            # trainer's of the full one: importance weights between them would be wrong.
            raise ValueError(
                f"rollout.top_p={self.rollout.top_p} needs algo.offpolicy: none (with "
                f"'{self.algo.offpolicy}' the engine's top-p log-probs would be compared with the "
                f"trainer's untruncated ones); or set rollout.top_p: 1.0")
        if self.algo.offpolicy == "mask" and self.rollout.max_async > 0:
            # A batch generated ahead is max_async versions old by design: "mask" would leave it
            # almost no token to train on (and masking only older tokens would train the rest
            # with no correction at all, which is what "mask" exists to avoid).
            raise ValueError(
                f"algo.offpolicy: mask with rollout.max_async={self.rollout.max_async} would mask "
                "nearly every token (batches generated ahead are older than the trainer's weights "
                "by design); use algo.offpolicy: tis (corrects them) or rollout.max_async: 0")
        samples = self.rollout.groups_per_step * self.rollout.group_size
        if self.train.updates_per_batch > samples:
            # The LR schedule counts steps x updates_per_batch optimizer updates; a batch cannot
            # be split into more mini-batches than it has samples.
            raise ValueError(f"train.updates_per_batch={self.train.updates_per_batch} exceeds the "
                             f"{samples} samples of a step (groups_per_step x group_size)")
        return self

    @property
    def advantage_std(self) -> str:
        """algo.advantage_std with its loss-dependent default filled in."""
        if self.algo.advantage_std is not None:
            return self.algo.advantage_std
        return "none" if self.algo.loss == "dr_grpo" else "group"


class RecipeError(UsageError):
    """A user mistake in a recipe or an override; its message is one line."""


def _known_keys(model: type[BaseModel], prefix: tuple[str, ...]) -> list[str]:
    """Field names valid at `prefix` in the schema (for 'did you mean')."""
    for part in prefix:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _one_line(error: ValidationError, source: str) -> str:
    """Turn pydantic's first error into `source: key: problem`."""
    first = error.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        known = _known_keys(Recipe, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else ""
        return f"{source}: unknown key '{key}'{hint}"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections names its keys itself
        return f"{source}: {msg}"
    return f"{source}: {key}: {msg}{got_text}"


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 8 is an int)."""
    if "=" not in assignment:
        raise RecipeError(f"override '{assignment}': expected key.sub=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override '{assignment}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override '{assignment}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise RecipeError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice "
                                  "(YAML would silently keep only the last)")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError with one line on any mistake."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} invalid YAML") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    source = str(path)
    for assignment in overrides:
        apply_override(tree, assignment)
        source = f"{path} (with overrides)"
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(_one_line(exc, source)) from None


def resolve_dtype(dtype: str, has_cuda: bool) -> str:
    """model.dtype with `auto` decided: bfloat16 on CUDA, float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_cuda else "float32"


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, in schema order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
