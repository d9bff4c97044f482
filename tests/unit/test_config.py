"""The recipe schema and rl-train's handling of bad input (one line, exit status 2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollover.trainer.cli import main
from rollover.trainer.config import RecipeError, apply_override, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(recipe, capsys):
    assert main([str(recipe), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("model:") and "rollout:" in printed


def test_overrides_are_typed_and_nested(tmp_path):
    recipe = load_recipe(ROOT / "recipes/grpo_math.yaml",
                         ["rollout.group_size=4", "train.lora.enabled=true", "algo.clip_c=3"])
    assert recipe.rollout.group_size == 4
    assert recipe.train.lora.enabled is True
    assert recipe.algo.clip_c == 3.0


def test_apply_override_builds_missing_sections():
    tree = {}
    apply_override(tree, "a.b.c=1.5")
    assert tree == {"a": {"b": {"c": 1.5}}}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.group_size=banana", "rollout.group_size"),
        ("rolout.group_size=8", "did you mean 'rollout'"),
        ("rollout.grop_size=8", "did you mean 'rollout.group_size'"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("algo.loss=ppo", "algo.loss"),
        ("task.digits_min=5", "digits_min must not exceed digits_max"),
        ("model.path=/does/not/exist", "model folder not found"),
        ("task.name=dataset", "task.path is required"),
        ("resume=/no/such/checkpoint", "train.resume"),
        ("group_size", "expected key.sub=value"),
    ],
)
def test_bad_input_is_one_line_exit_2(override, expected):
    result = subprocess.run(
        [sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"), override],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("no/such/recipe.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  group_size: [1,\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["rollout.temperature=0"], "rollout.temperature"),
        (["rollout.top_p=0.9"], "rollout.top_p=0.9 needs algo.offpolicy: none"),
        (["rollout.top_p=0.9", "algo.offpolicy=mask"], "needs algo.offpolicy: none"),
        (["train.lora.dropout=0.1"], "train.lora.dropout: must be 0"),
        (["rollout.group_size=8", "train.updates_per_batch=65"], "exceeds the 64 samples"),
        (["rollout.temperature=2.5"], "rollout.temperature"),  # vLLM refuses it on every request
        (["rollout.over_provision=0.5"], "rollout.over_provision: must be a number >= 1"),
        (["rollout.over_provision=lots"], "rollout.over_provision: must be a number >= 1 .* or 'auto'"),
        (["rollout.max_async=5"], "max_async=5 exceeds max_staleness=4"),
        (["rollout.max_async=1", "rollout.partial=false"], "max_async > 0 needs partial: true"),
        (["rollout.max_async=1", "algo.offpolicy=mask"], "offpolicy: mask with rollout.max_async=1 would mask"),
        (["rollout.interrupt=pause"], "rollout.interrupt"),
        (["cluster.engines=2"], "cluster.engines=2 needs Ray: set cluster.address"),
        (["cluster.address=remote"], "cluster.address"),
        (["cluster.engines=0"], "cluster.engines"),
        (["cluster.address=local", "cluster.tensor_parallel_size=2"], "needs cluster.engine_num_gpus >= 2"),
        (["cluster.placement=colocated", "cluster.engine_num_gpus=0.5"], "set cluster.trainer_num_gpus"),
        (["cluster.engine_num_cpus=-1"], "cluster.engine_num_cpus"),
        (["model.dtype=float16"], r"model.dtype: float16 is not supported .*; use bfloat16 or float32 \(got"),
    ],
)
def test_settings_that_would_train_wrongly_are_refused(overrides, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(ROOT / "recipes/grpo_math.yaml", overrides)


def test_masking_stale_tokens_is_allowed_without_running_ahead_and_tis_with_it():
    masked = load_recipe(ROOT / "recipes/grpo_math.yaml", ["algo.offpolicy=mask"])
    ahead = load_recipe(ROOT / "recipes/grpo_math.yaml", ["rollout.max_async=1", "algo.offpolicy=tis"])
    assert (masked.algo.offpolicy, masked.rollout.max_async) == ("mask", 0)
    assert (ahead.algo.offpolicy, ahead.rollout.max_async) == ("tis", 1)


def test_top_p_is_allowed_without_importance_weights():
    recipe = load_recipe(ROOT / "recipes/grpo_math.yaml", ["rollout.top_p=0.9", "algo.offpolicy=none"])
    assert recipe.rollout.top_p == 0.9


@pytest.mark.parametrize("loss, given, expected", [
    ("dr_grpo", None, "none"), ("grpo", None, "group"), ("dapo", None, "group"),
    ("dr_grpo", "group", "group"), ("grpo", "batch", "batch"),
])
def test_advantage_std_default_follows_the_loss(loss, given, expected):
    overrides = [f"algo.loss={loss}", f"algo.advantage_std={given or 'null'}"]
    assert load_recipe(ROOT / "recipes/grpo_math.yaml", overrides).advantage_std == expected


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_on_cpu():
    from rollover.trainer.config import resolve_dtype

    assert resolve_dtype("auto", has_cuda=True) == "bfloat16"
    assert resolve_dtype("auto", has_cuda=False) == "float32"
    assert resolve_dtype("bfloat16", has_cuda=False) == "bfloat16"


def test_a_section_given_twice_is_refused(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("train:\n  steps: 5\nrollout:\n  group_size: 4\ntrain:\n  lr: 1.0e-5\n")
    with pytest.raises(RecipeError, match="line 5: key 'train' is given twice"):
        load_recipe(recipe)


def test_a_key_given_twice_in_a_section_is_refused(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("train:\n  steps: 5\n  steps: 6\n")
    with pytest.raises(RecipeError, match="key 'steps' is given twice"):
        load_recipe(recipe)


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("train:\n  output_dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(recipe)


def test_no_arguments_shows_usage_with_optional_overrides():
    result = subprocess.run([sys.executable, "-m", "rollover.trainer.cli"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "usage: rl-train" in result.stderr and "[overrides ...]" in result.stderr
    assert "a recipe is required" in result.stderr and "overrides" not in result.stderr.splitlines()[-1]


def test_wandb_online_without_a_key_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env["NETRC"] = str(tmp_path / "no-netrc")
    result = subprocess.run(
        [sys.executable, "-m", "rollover.trainer.cli", str(ROOT / "recipes/grpo_math.yaml"),
         "tracking.wandb=online", f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("rl-train: error: tracking.wandb=online needs a W&B API key")
    assert not (tmp_path / "run").exists()


def test_pipeline_and_auto_provisioning_settings_parse():
    recipe = load_recipe(ROOT / "recipes/grpo_math.yaml", [
        "rollout.over_provision=auto", "rollout.max_async=2", "rollout.interrupt=keep"])
    assert (recipe.rollout.over_provision, recipe.rollout.max_async, recipe.rollout.interrupt) == ("auto", 2, "keep")
    assert load_recipe(ROOT / "recipes/grpo_math.yaml", ["rollout.over_provision=3"]).rollout.over_provision == 3.0


def test_cluster_settings_parse():
    recipe = load_recipe(ROOT / "recipes/grpo_math.yaml", ["cluster.address=local", "cluster.engines=2",
                                                          "cluster.engine_num_cpus=0.5"])
    assert (recipe.cluster.address, recipe.cluster.engines, recipe.cluster.engine_num_cpus) == ("local", 2, 0.5)
    assert load_recipe(ROOT / "recipes/grpo_math.yaml").cluster.address is None  # one in-process engine
