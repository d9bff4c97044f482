"""Tasks: deterministic records, their verifiers, and local datasets."""

import json

import pytest

from rollover.tasks import arithmetic
from rollover.tasks.registry import DatasetTask, ReasoningGymTask, TaskError, build_task, gold_answer
from rollover.trainer.config import TaskConfig


def test_scratchpad_written_out_by_hand():
    assert arithmetic.scratchpad([47, 85]) == "7+5=12;4+8+1=13;"
    assert arithmetic.solution_text([47, 85]) == "7+5=12;4+8+1=13;#132"
    assert arithmetic.solution_text([5, 905, 99]) == "5+5+9=19;0+9+1=10;9+1=10;#1009"
    assert arithmetic.solution_text([3, 4], with_scratchpad=False) == "#7"


def test_problems_are_a_function_of_seed_and_index():
    a = arithmetic.make_problem(7, 42, 1, 4, 3)
    assert a == arithmetic.make_problem(7, 42, 1, 4, 3)
    assert len(a) == 3 and all(0 <= n < 10_000 for n in a)
    streams = {tuple(arithmetic.make_problem(7, i, 3, 3, 2)) for i in range(50)}
    assert len(streams) > 45  # distinct problems, not one repeated


def test_difficulty_knobs_lengthen_the_scratchpad():
    short = [len(arithmetic.arithmetic_record(0, i, 1, 1, 2, True)["solution"]) for i in range(20)]
    long = [len(arithmetic.arithmetic_record(0, i, 5, 5, 4, True)["solution"]) for i in range(20)]
    assert max(short) < min(long)


@pytest.mark.parametrize("text, expected", [("7+5=12;#132", 132), ("#  9 junk", 9), ("no answer", None),
                                            ("#12#13", 12)])
def test_extract_answer(text, expected):
    assert arithmetic.extract_answer(text) == expected


def test_arithmetic_task_scores_and_holds_out():
    task = build_task(TaskConfig(name="arithmetic", digits_min=3, digits_max=3))
    record = task.record(0)
    assert task.score(record["solution"], record) == 1.0
    assert task.score("#" + str(int(record["answer"]) + 1), record) == 0.0
    train = {task.record(i)["question"] for i in range(200)}
    held_out = {r["question"] for r in task.eval_records(200)}
    assert len(train & held_out) < 10  # independent streams over 810k problems


def test_reasoning_gym_regenerates_and_scores():
    task = ReasoningGymTask("basic_arithmetic", seed=3, config={})
    record = task.record(5)
    again = ReasoningGymTask("basic_arithmetic", seed=3, config={}).record(5)
    assert record["question"] == again["question"]
    assert task.score(record["answer"], record) == 1.0
    assert task.score("definitely not it", record) == 0.0


def test_reasoning_gym_unknown_name():
    with pytest.raises(TaskError, match="gym_dataset"):
        ReasoningGymTask("no_such_gym_task", seed=0, config={})


def test_gold_answer_gsm8k_style():
    assert gold_answer("She has 3+4=7 apples.\n#### 7") == "7"
    assert gold_answer("42") == "42"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_local_dataset_formats(tmp_path, fmt):
    import datasets

    rows = [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2*i}\n#### {2*i}"} for i in range(12)]
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        path = tmp_path / ("data.parquet" if fmt == "parquet" else "saved")
        ds.to_parquet(str(path)) if fmt == "parquet" else ds.save_to_disk(str(path))
    task = DatasetTask(str(path), "question", "answer", eval_size=2)
    assert task.record(0)["answer"] == "0" and task.record(10) == task.record(0)  # 10 train rows, cycled
    assert [r["answer"] for r in task.eval_records(5)] == ["20", "22"]
    record = task.record(3)
    assert task.score("so the answer is \\boxed{6}", record) == 1.0
    assert task.score("The total is 6 apples.", record) == 1.0
    assert task.score("I think 7.", record) == 0.0


def test_dataset_errors(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        DatasetTask(str(tmp_path / "missing.jsonl"), "question", "answer", 1)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"q": "x", "a": "1"}) for _ in range(5)))
    with pytest.raises(TaskError, match="missing column"):
        DatasetTask(str(path), "question", "answer", 1)
