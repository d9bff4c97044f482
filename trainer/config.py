"""The recipe schema: one typed section per concern, keys named as in the code that uses them.

A recipe is YAML; `load_recipe` reads it, applies `key.sub=value` overrides and validates it.
Every user mistake becomes a `RecipeError` with one line naming the file and the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    """Base for every section: unknown keys are errors, and assignment is validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class RewardSpec(Section):
    fn: str = "correctness"  # a registered reward name, or "module:function"
    weight: float = 1.0


class TaskConfig(Section):
    name: Literal["arithmetic", "reasoning_gym", "dataset"] = "arithmetic"
    seed: int = 0
    # arithmetic
    digits_min: int = Field(1, ge=1, le=12)
    digits_max: int = Field(3, ge=1, le=12)
    operands: int = Field(2, ge=2, le=6)  # numbers per problem; the fewest with operands_max
    # None: every problem has `operands` numbers; else each draws its count from operands..this.
    operands_max: int | None = Field(None, ge=2, le=6)
    scratchpad: bool = True
    # reasoning_gym
    gym_dataset: str = "basic_arithmetic"
    gym_config: dict[str, Any] = Field(default_factory=dict)
    # dataset (JSONL, Parquet, or a `datasets` folder saved to disk)
    path: str | None = None
    question_key: str = "question"
    answer_key: str = "answer"
    # prompts and rewards
    prompt_format: Literal["raw", "chat"] = "raw"
    system_prompt: str | None = None
    eval_size: int = Field(64, ge=1)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec()])
    reward_timeout: float = Field(10.0, gt=0)  # seconds per call; an overrunning call is killed
    # Stop the run when a reward function fails on every sample for this many steps in a row.
    max_reward_failure_steps: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        if self.digits_min > self.digits_max:
            raise ValueError("digits_min must not exceed digits_max")
        if self.operands_max is not None and self.operands_max < self.operands:
            raise ValueError("operands_max must not be less than operands")
        if self.name == "dataset" and not self.path:
            raise ValueError("task.path is required when task.name is 'dataset'")
        return self


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
    kv_cache_gib: float = Field(1.0, gt=0)  # VLLM_CPU_KVCACHE_SPACE on CPU
    # CPU only: cores for the engine's worker ("1", "2-7"); the trainer is pinned to the rest.
    # None: vLLM's choice (all cores but one), the trainer unpinned (trainer/cpu_split.py).
    engine_cpus: str | None = None
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1.0)
    weight_bucket_mb: float = Field(512.0, gt=0)  # ipc weight loads stage this much on the GPU at a time
    enforce_eager: bool | None = None  # None: CUDA graphs on a GPU, eager on CPU
    # Colocated trainer on one GPU: the engine sleeps (frees its weights and KV cache) during
    # the update and wakes for the next rollout. CUDA only.
    sleep_mode: bool = False
    # A step stops with one line once the filter rejects this many groups (None: 50 x N').
    max_rejections_per_step: int | None = Field(None, ge=1)
    # Deadline of each weight load and of its check (rollout/weight_check.py), every engine
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
        from rollover.trainer.cpu_split import parse_cpu_list

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


class AlgoConfig(Section):
    loss: Literal["grpo", "dapo", "dr_grpo", "bnpo", "gspo", "gspo_token"] = "grpo"
    # None: "none" for dr_grpo (the design drops the std term), "group" for every other loss.
    advantage_std: Literal["group", "batch", "none"] | None = None
    clip_low: float = Field(0.2, ge=0.0)
    clip_high: float = Field(0.2, ge=0.0)
    clip_c: float | None = Field(None, gt=1.0)  # dual clip for negative advantages
    kl_coef: float = Field(0.0, ge=0.0)
    offpolicy: Literal["tis", "mask", "none"] = "tis"
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
    cpu_threads: int | None = Field(None, ge=1)  # trainer threads on a CPU-only host; default 1
    max_bad_steps: int = Field(3, ge=0)  # NaN/inf losses tolerated (skipped) before stopping
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TrackingConfig(Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "rollover"
    run_name: str | None = None
    sample_table_rows: int = Field(4, ge=0)


class SwarmConfig(Section):
    """SAPO: share decoded rollouts with peers over a hivemind DHT (swarm/, `rl-swarm`)."""

    enabled: bool = False
    name: str = Field("rollover", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")  # DHT namespace
    initial_peers: list[str] = Field(default_factory=list)  # multiaddrs printed by `rl-swarm bootstrap`
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = Field(default_factory=list)
    identity_path: str | None = None  # folder for the node's keys; None: the run folder
    local_groups: int | None = Field(None, ge=1)  # I; None: rollout.groups_per_step (must match)
    external_groups: int = Field(4, ge=0)  # J: peers' groups trained on per step, when there are any
    # rounds are epochs of the wall clock; whole seconds, so a bootstrap node's DHT guard that was
    # not told the length serves the swarm anyway (swarm/guard.py)
    round_seconds: float = Field(30.0, ge=1.0, le=3600.0, multiple_of=1.0)
    max_record_bytes: int = Field(12288, ge=1024, le=16384)  # one group; hivemind's pipe breaks past ~24 KiB
    max_groups_per_peer: int = Field(16, ge=1, le=256)  # per sender per round, and in the pool
    max_external_share_per_peer: float = Field(0.5, gt=0.0, le=1.0)  # of J, per step
    max_completion_chars: int = Field(2048, ge=16)
    likelihood_z: float = Field(6.0, gt=0.0)  # robust z below own samples' log-likelihood: rejected

    @field_validator("initial_peers", "host_maddrs", "announce_maddrs")
    @classmethod
    def _maddrs(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.startswith("/"):
                raise ValueError(f"{value!r} is not a multiaddr (like /ip4/1.2.3.4/tcp/31337/p2p/Qm...)")
        return values


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
    weight_transfer: Literal["auto", "shared_memory", "ipc", "nccl"] = "auto"

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


class RecipeError(Exception):
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
