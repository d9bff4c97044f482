"""The engine/trainer core split of a CPU-only host (`rollout.engine_cpus`)."""

import pytest

from rollover.trainer.config import RecipeError, load_recipe
from rollover.trainer.runtime.cpu_split import check_engine_cpus, parse_cpu_list, recipe_threads, trainer_threads

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, cores", [("1", {1}), ("2-5", {2, 3, 4, 5}), ("0,2-3", {0, 2, 3}),
                                         (" 1, 3 ", {1, 3})])
def test_core_lists(text, cores):
    assert parse_cpu_list(text) == cores


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "1;2"])
def test_bad_core_lists(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_the_split_must_leave_the_trainer_a_core_and_name_only_real_ones():
    assert check_engine_cpus("1", {0, 1}) == {1}
    with pytest.raises(ValueError, match="leaves no core for the trainer"):
        check_engine_cpus("0-1", {0, 1})
    with pytest.raises(ValueError, match=r"names cores \[7\]"):
        check_engine_cpus("1,7", {0, 1})


def test_recipe_key_takes_a_number_or_a_list():
    assert load_recipe(ROOT / "recipes/grpo_math.yaml", ["rollout.engine_cpus=1"]).rollout.engine_cpus == "1"
    with pytest.raises(RecipeError, match="rollout.engine_cpus"):
        load_recipe(ROOT / "recipes/grpo_math.yaml", ["rollout.engine_cpus=x-y"])


EIGHT = set(range(8))


@pytest.mark.parametrize("cpu_threads, max_async, world_size, engine_cpus, threads", [
    (None, 0, 1, None, 8),    # rollout and update take turns: the update has every core
    (None, 1, 1, None, 1),    # pipelined: the engine generates on all cores but one
    (None, 0, 2, None, 4),    # two ranks share the cores
    (None, 1, 1, "0-5", 2),   # a split: the cores the engine was not given, in either mode
    (None, 0, 2, "0-5", 1),
    (None, 0, 1, "0-9", 1),   # a split the run will refuse: no guess
    (3, 0, 1, None, 3),       # the recipe's setting wins
    (3, 1, 2, "0-5", 3),
])
def test_trainer_threads(cpu_threads, max_async, world_size, engine_cpus, threads):
    assert trainer_threads(cpu_threads, max_async, world_size, EIGHT, engine_cpus) == threads


def test_a_recipe_without_a_setting_updates_on_every_core_unless_pipelined():
    import os

    cores = len(os.sched_getaffinity(0))
    assert recipe_threads(load_recipe(ROOT / "recipes" / "grpo_math.yaml")) == cores
    assert recipe_threads(load_recipe(ROOT / "recipes" / "grpo_math.yaml", ["rollout.max_async=1"])) == 1
    assert recipe_threads(load_recipe(ROOT / "recipes" / "grpo_math.yaml", ["train.cpu_threads=5"])) == 5
