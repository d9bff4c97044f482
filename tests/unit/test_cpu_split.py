"""The engine/trainer core split of a CPU-only host (`rollout.engine_cpus`)."""

import pytest

from rollover.trainer.config import RecipeError, load_recipe
from rollover.trainer.runtime.cpu_split import check_engine_cpus, parse_cpu_list

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
