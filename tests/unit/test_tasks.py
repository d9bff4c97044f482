"""Tasks: deterministic records, their verifiers, and local datasets."""

import json
import logging
import random

import pytest

from rollover.tasks import arithmetic
from rollover.tasks.registry import DatasetTask, ReasoningGymTask, TaskError, build_task, gold_answer
from rollover.trainer.config import RecipeError, load_recipe
from rollover.tasks.config import TaskConfig


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


def test_fixed_operand_count_keeps_the_original_stream_and_spec():
    # The stream as it was drawn before operands_max existed: digits, then the numbers.
    rng = random.Random("arithmetic:7:42")
    digits = rng.randint(1, 4)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    original = [rng.randint(low, 10**digits - 1) for _ in range(3)]
    assert arithmetic.make_problem(7, 42, 1, 4, 3) == original
    assert arithmetic.make_problem(7, 42, 1, 4, 3, operands_max=3) == original  # equal max: fixed
    for operands_max in (None, 2):
        spec = arithmetic.arithmetic_record(0, 3, 1, 3, 2, True, operands_max=operands_max)["spec"]
        assert spec == {"task": "arithmetic", "seed": 0, "index": 3, "digits_min": 1,
                        "digits_max": 3, "operands": 2}


def test_variable_operand_count():
    problems = [arithmetic.make_problem(5, i, 1, 6, 2, operands_max=5) for i in range(200)]
    assert {len(p) for p in problems} == {2, 3, 4, 5}
    assert all(len({len(str(n)) for n in p}) == 1 for p in problems)  # one digit count per problem
    assert problems[17] == arithmetic.make_problem(5, 17, 1, 6, 2, operands_max=5)
    record = arithmetic.arithmetic_record(5, 17, 1, 6, 2, True, operands_max=5)
    assert record["spec"] == {"task": "arithmetic", "seed": 5, "index": 17, "digits_min": 1,
                              "digits_max": 6, "operands": 2, "operands_max": 5}
    assert int(record["answer"]) == sum(problems[17])
    with pytest.raises(ValueError, match="operands_max 2 is less than operands 3"):
        arithmetic.make_problem(5, 0, 1, 2, 3, operands_max=2)


def test_five_operand_scratchpad_by_hand():
    # 99999+88888+77777+66666+55555 = 388885; every column sums to 35, then 38 with the carry 3.
    first, rest = "9+8+7+6+5=35;", "9+8+7+6+5+3=38;" * 4
    assert arithmetic.solution_text([99999, 88888, 77777, 66666, 55555]) == first + rest + "#388885"


def test_variable_operands_give_a_long_tail_of_solution_lengths():
    lengths = sorted(len(arithmetic.arithmetic_record(0, i, 1, 6, 2, True, operands_max=5)["solution"])
                     for i in range(1000))
    median, longest = lengths[500], lengths[-1]
    assert longest >= 2 * median  # most are short, a few are long
    assert longest <= 6 * len("9+9+9+9+9+4=49;") + len("#4999995")  # the longest possible


def test_task_config_operands_max():
    task = build_task(TaskConfig(name="arithmetic", digits_min=1, digits_max=6, operands_max=5))
    counts = {len(r["question"].split("+")) for r in (task.record(i) for i in range(100))}
    assert counts == {2, 3, 4, 5}
    assert task.eval_records(1)[0]["spec"]["operands_max"] == 5
    assert "operands_max" not in build_task(TaskConfig(name="arithmetic")).record(0)["spec"]


@pytest.mark.parametrize("override, message", [
    ("task.operands_max=1", "task.operands_max: Input should be greater than or equal to 2 (got 1)"),
    ("task.operands_max=7", "task.operands_max: Input should be less than or equal to 6 (got 7)"),
    ("task.operands_max=abc", "task.operands_max: Input should be a valid integer"),
])
def test_bad_operands_max_is_one_line(tmp_path, override, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task:\n  operands: 3\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, [override])
    assert str(caught.value).startswith(f"{recipe} (with overrides): {message}")


def test_operands_max_below_operands_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task:\n  operands: 3\n  operands_max: 2\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert str(caught.value) == f"{recipe}: task: operands_max must not be less than operands"


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


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_rows_without_an_answer_are_dropped_and_counted(tmp_path, caplog):
    good = [json.dumps({"question": f"{i}+{i}?", "answer": str(2 * i)}) for i in range(6)]
    no_answer = [json.dumps({"question": "a?", "answer": None}), json.dumps({"question": "b?"}),
                 json.dumps({"question": "c?", "answer": ""}), json.dumps({"question": "d?", "answer": "  "}),
                 json.dumps({"question": "e?", "answer": "working...\n####"}),
                 json.dumps({"question": None, "answer": "3"})]
    path = _jsonl(tmp_path / "d.jsonl", [good[0], no_answer[0], good[1], *no_answer[1:], *good[2:]])
    with caplog.at_level(logging.WARNING, logger="rollover.tasks.registry"):
        task = DatasetTask(path, "question", "answer", eval_size=2)
    assert task.dropped_rows == 6
    assert [r.getMessage() for r in caplog.records] == [
        f"task.path {path}: dropped 6 of 12 rows without a question or answer"]
    # The kept rows, in file order: 4 to train on, 2 held out; none answers "None".
    assert [task.record(i)["answer"] for i in range(4)] == ["0", "2", "4", "6"]
    assert [r["answer"] for r in task.eval_records(5)] == ["8", "10"]
    assert task.record(1)["spec"]["row"] == 2  # the row's place in the file, blank rows skipped


def test_numbers_are_text_and_other_values_are_refused(tmp_path):
    rows = [{"question": 7, "answer": 42}, {"question": "half of 5?", "answer": 2.5},
            {"question": "q", "answer": "#### 3"}]
    task = DatasetTask(_jsonl(tmp_path / "n.jsonl", [json.dumps(r) for r in rows]), "question", "answer", 1)
    assert task.record(0)["question"] == "7" and task.record(0)["answer"] == "42"
    assert task.record(1)["answer"] == "2.5" and task.eval_records(1)[0]["answer"] == "3"
    assert task.score("the answer is 42", task.record(0)) == 1.0
    for bad, shown in [([1, 2], "list ([1, 2])"), ({"a": 1}, "dict ({'a': 1})"), (True, "bool (True)")]:
        lines = [json.dumps(rows[0]), json.dumps({"question": "q", "answer": bad}), json.dumps(rows[1])]
        path = _jsonl(tmp_path / "bad.jsonl", lines)
        with pytest.raises(TaskError) as caught:
            DatasetTask(path, "question", "answer", 1)
        assert str(caught.value) == (f"task.path {path}: line 2: 'answer' is a {shown}, "
                                     f"expected text or a number")


def test_parquet_rows_are_checked_the_same_way(tmp_path):
    import datasets

    rows = [{"question": f"q{i}", "answer": None if i == 1 else str(i)} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    task = DatasetTask(str(tmp_path / "d.parquet"), "question", "answer", eval_size=1)
    assert task.dropped_rows == 1 and [task.record(i)["answer"] for i in range(3)] == ["0", "2", "3"]
    nested = [{"question": "q", "answer": [1]}, {"question": "q", "answer": [2, 3]}]
    datasets.Dataset.from_list(nested).to_parquet(str(tmp_path / "n.parquet"))
    with pytest.raises(TaskError, match=r"n.parquet: row 0: 'answer' is a list \(\[1\]\)"):
        DatasetTask(str(tmp_path / "n.parquet"), "question", "answer", eval_size=1)


@pytest.mark.parametrize("name, text, message", [
    ("empty.jsonl", "", "the file has no rows"),
    ("blank.jsonl", "\n  \n", "the file has no rows"),
    ("empty.json", "[]", "the file has no rows"),
    ("nothing.jsonl", '{"question": "q", "answer": null}\n{"question": "", "answer": "1"}\n',
     "none of its 2 rows has both a 'question' and an 'answer'"),
    ("broken.jsonl", '{"question": "q", "answer": "1"}\n\n{"question": "q", "answer": "1"}\n'
     '{"question": "q", "answer": \n', "line 4 is not valid JSON (Expecting value, column 29)"),
    ("array.jsonl", '{"question": "q", "answer": "1"}\n[1, 2]\n', "line 2 is not a JSON object"),
    ("latin1.jsonl", '{"question": "q", "answer": "1"}\n{"question": "caf\xe9", "answer": "1"}\n',
     "line 2 is not UTF-8 text"),
    ("object.json", '{"question": ["q"], "answer": ["1"]}', "expected a JSON list of objects"),
])
def test_unusable_files_fail_in_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(TaskError) as caught:
        DatasetTask(str(path), "question", "answer", eval_size=1)
    assert str(caught.value).startswith(f"task.path {path}: {message}")
    assert "\n" not in str(caught.value)


def test_json_list_and_json_lines_under_a_json_name(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("list.json", "lines.json"):
        task = DatasetTask(str(tmp_path / name), "question", "answer", eval_size=1)
        assert [task.record(i)["answer"] for i in range(2)] == ["0", "1"]


def test_rl_train_refuses_a_malformed_dataset_before_the_engine_starts(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    data = _jsonl(tmp_path / "d.jsonl", [json.dumps({"question": "q", "answer": "1"})] * 3 + ["{oops"])
    root = Path(__file__).resolve().parents[2]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "rollover.trainer.cli", str(root / "recipes/grpo_math.yaml"),
         "task.name=dataset", f"task.path={data}", f"train.output_dir={tmp_path / 'run'}",
         "tracking.wandb=disabled"],
        capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"rl-train: error: task.path {data}: line 4 is not valid JSON "
        f"(Expecting property name enclosed in double quotes, column 2)")
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # written once the engine has started
    assert time.monotonic() - started < 60  # imports only; the engine alone takes ~25 s to start
