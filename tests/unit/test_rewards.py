"""Reward functions: TRL's signature, weights, and failures that are scored, never raised."""

import time

from rollover.tasks.registry import ArithmeticTask
from rollover.tasks.rewards import RewardRunner, correctness_reward


def _records():
    task = ArithmeticTask(seed=0, digits_min=2, digits_max=2, operands=2, scratchpad=True)
    return task, [task.record(i) for i in range(3)]


def test_weighted_sum_and_none_is_skipped():
    task, records = _records()
    completions = [records[0]["solution"], "#-1", records[2]["solution"]]

    def length_bonus(prompts, completions, **columns):
        return [None if c.startswith("#") else 0.5 for c in completions]

    runner = RewardRunner([("correctness", correctness_reward(task), 2.0), ("bonus", length_bonus, 1.0)], 5.0)
    # By hand: correct → 2*1 + 0.5; "#-1" → 2*0 + skipped; correct → 2.5.
    assert runner.score(["p"] * 3, completions, records) == [2.5, 0.0, 2.5]
    assert not runner.failures


def test_columns_reach_the_function():
    _, records = _records()
    seen = {}

    def spy(prompts, completions, answer, **rest):
        seen["answer"], seen["rest"] = answer, set(rest)
        return [1.0] * len(completions)

    RewardRunner([("spy", spy, 1.0)], 5.0).score(["p"] * 3, ["c"] * 3, records)
    assert seen["answer"] == [r["answer"] for r in records]
    assert {"question", "spec", "solution"} <= seen["rest"]


def test_raising_slow_and_malformed_functions_are_counted():
    _, records = _records()

    def boom(prompts, completions, **_):
        raise RuntimeError("judge down")

    def slow(prompts, completions, **_):
        time.sleep(3)
        return [1.0] * len(completions)

    def short(prompts, completions, **_):
        return [1.0]

    def nan(prompts, completions, **_):
        return [float("nan")] * len(completions)

    runner = RewardRunner([("boom", boom, 1.0), ("slow", slow, 1.0), ("short", short, 1.0),
                           ("nan", nan, 1.0), ("one", lambda p, c, **_: [1.0] * len(c), 1.0)], timeout=0.5)
    started = time.time()
    assert runner.score(["p"] * 3, ["c"] * 3, records) == [1.0, 1.0, 1.0]
    assert time.time() - started < 2.5  # the slow judge did not hold the caller
    assert runner.failures == {"boom": 3, "slow": 3, "short": 3, "nan": 3}


def test_correctness_ignores_non_column_keywords():
    # TRL's GRPOTrainer passes trainer_state and logging callbacks beside the dataset columns.
    task, records = _records()
    fn = correctness_reward(task)
    scores = fn(["p"] * 2, [records[0]["solution"], "#0"], answer=[r["answer"] for r in records[:2]],
                trainer_state=object(), log_metric=print)
    assert scores == [1.0, 0.0]
