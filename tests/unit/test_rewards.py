"""Reward functions: TRL's signature, weights, and failures that are scored, never raised."""

import logging

from rollover.tasks.registry import ArithmeticTask
from rollover.tasks.rewards import RewardRunner, correctness_reward
from rollover.tasks.config import TaskConfig


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


def test_raising_and_malformed_functions_are_counted():
    _, records = _records()

    def boom(prompts, completions, **_):
        raise RuntimeError("judge down")

    def short(prompts, completions, **_):
        return [1.0]

    def nan(prompts, completions, **_):
        return [float("nan")] * len(completions)

    runner = RewardRunner([("boom", boom, 1.0), ("short", short, 1.0), ("nan", nan, 1.0),
                           ("one", lambda p, c, **_: [1.0] * len(c), 1.0)], timeout=0.5)
    assert runner.score(["p"] * 3, ["c"] * 3, records) == [1.0, 1.0, 1.0]
    assert runner.failures == {"boom": 3, "short": 3, "nan": 3}


def test_first_failure_is_one_line_and_later_ones_are_counted(caplog):
    _, records = _records()
    calls = []

    def flaky(prompts, completions, **_):
        calls.append(1)
        if len(calls) % 2:
            raise ZeroDivisionError("division by zero\nsecond line of the message")
        return [1.0] * len(completions)

    runner = RewardRunner([("tests.x:f", flaky, 1.0)], timeout=5.0)
    with caplog.at_level(logging.WARNING, logger="rollover.tasks.rewards"):
        for _ in range(5):  # calls 1, 3 and 5 fail
            runner.score(["p"] * 3, ["c"] * 3, records)
    assert [r.getMessage() for r in caplog.records] == [
        "reward tests.x:f failed: ZeroDivisionError: division by zero "
        "(later failures are counted in reward_failures/tests.x:f)"]
    assert runner.failures == {"tests.x:f": 9}
    assert runner.take_step_report() == {"reward_failures/tests.x:f": 9}
    assert runner.take_step_report() == {"reward_failures/tests.x:f": 0}  # per step, then reset


def test_a_function_failing_every_sample_for_n_steps_stops_the_run():
    _, records = _records()
    failing = {"on": True}

    def judge(prompts, completions, **_):
        if failing["on"]:
            raise ConnectionError("judge unreachable")
        return [0.5] * len(completions)

    def half(prompts, completions, **_):  # fails on some samples only: never a stop
        if len(completions) == 1:
            raise ValueError("one")
        return [1.0] * len(completions)

    runner = RewardRunner([("judge", judge, 1.0), ("half", half, 1.0)], timeout=5.0, max_failure_steps=3)

    def step(*batch_sizes):
        for n in batch_sizes:
            runner.score(["p"] * n, ["c"] * n, records[:n])
        runner.take_step_report()
        return runner.stop_reason()

    assert step(3, 1) is None and step(3, 1) is None  # judge: 2 steps failing everything
    failing["on"] = False
    assert step(3) is None and runner.streaks["judge"] == 0  # one good call resets the streak
    failing["on"] = True
    assert step(2) is None and step() is None  # a step that scored nothing changes nothing
    assert step(2) is None
    reason = step(2, 1)
    assert reason == ("reward judge failed on every sample for 3 steps in a row "
                      "(task.max_reward_failure_steps=3); last error: ConnectionError: judge unreachable")
    assert runner.streaks["half"] == 0  # failed on 1 of 3 samples in the last step

    resumed = RewardRunner([("judge", judge, 1.0), ("half", half, 1.0)], timeout=5.0, max_failure_steps=4)
    resumed.load_state_dict(runner.state_dict())  # a resumed run goes on counting
    assert resumed.failures == runner.failures and resumed.streaks["judge"] == 3
    assert resumed.stop_reason() is None  # task.max_reward_failure_steps raised to 4 on resume


def test_builtin_arithmetic_verifier_runs_in_process():
    # Bounded (one regex over the completion): no worker processes for the default recipe.
    task = ArithmeticTask(seed=0, digits_min=2, digits_max=2, operands=2, scratchpad=True)
    runner = RewardRunner.from_config(TaskConfig(), task)
    assert runner.workers is None
    record = task.record(0)
    assert runner.score(["p"], [record["solution"]], [record]) == [1.0]


def test_correctness_ignores_non_column_keywords():
    # TRL's GRPOTrainer passes trainer_state and logging callbacks beside the dataset columns.
    task, records = _records()
    fn = correctness_reward(task)
    scores = fn(["p"] * 2, [records[0]["solution"], "#0"], answer=[r["answer"] for r in records[:2]],
                trainer_state=object(), log_metric=print)
    assert scores == [1.0, 0.0]
