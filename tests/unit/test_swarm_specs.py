"""Specs that cross the swarm, and peers' statuses shown by `rl-swarm status`.

Every task's spec must survive the record schema (scalars only) and name the task the same way on
every machine: a dataset by its content, not by a local path. A peer's status is its own text:
it must never crash or drive the terminal of whoever reads it.
"""

import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rollover.swarm.cli import rejections_text
from rollover.swarm.records import Caps, decode_group, encode_group
from rollover.tasks.registry import DatasetTask, ReasoningGymTask, record_from_spec


def test_a_reasoning_gym_spec_crosses_the_swarm():
    task = ReasoningGymTask("basic_arithmetic", 3, {"min_terms": 2, "max_terms": 3})
    record = task.record(5)
    raw = encode_group(7, record["spec"], ["1"])  # raised ValidationError: the spec held a dict
    spec = decode_group(raw, Caps()).spec
    other = ReasoningGymTask("basic_arithmetic", 3, {"max_terms": 3, "min_terms": 2})  # another node
    assert record_from_spec(other, dict(spec))["question"] == record["question"]
    changed = ReasoningGymTask("basic_arithmetic", 3, {"min_terms": 2, "max_terms": 4})
    assert spec["config"] != changed.record(5)["spec"]["config"]  # other settings: another task


def test_a_dataset_is_named_by_its_content_not_its_path(tmp_path):
    rows = [{"question": f"q{i}?", "answer": str(i * 7)} for i in range(12)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = tmp_path / "a" / "train.jsonl"
    first.write_text("".join(json.dumps(row) + "\n" for row in rows))
    second = tmp_path / "b" / "copy.json"  # the same rows elsewhere, in another format
    second.write_text(json.dumps(rows))
    mine = DatasetTask(str(first), "question", "answer", eval_size=2)
    theirs = DatasetTask(str(second), "question", "answer", eval_size=2)

    spec = decode_group(encode_group(1, theirs.record(4)["spec"], ["28"]), Caps()).spec
    assert str(second) not in json.dumps(spec)
    assert record_from_spec(mine, dict(spec)) == mine.record(4)  # was unknown_task (paths differ)

    edited = tmp_path / "b" / "edited.jsonl"  # one answer changed: another dataset
    edited.write_text("".join(json.dumps({**row, "answer": "0"} if i == 3 else row) + "\n"
                              for i, row in enumerate(rows)))
    assert DatasetTask(str(edited), "question", "answer", 2).record(4)["spec"] != spec


def rendered(cell: str) -> str:
    table = Table()
    table.add_column("rejected")
    table.add_row(Text(cell))
    console = Console(width=200, record=True, force_terminal=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_hostile_statuses_render_as_plain_text():
    cases = {
        "list": {"rejected": [1]},  # crashed: .items() of a list
        "markup": {"rejected": {"[/]": 1, "[bold red]x": 2}},  # crashed: rich markup
        "escape": {"rejected": {"\x1b[2J\x1b]0;pwned\x07wiped": 3, "bidi\u202eevil": 4}},
        "types": {"rejected": {"ok": True, "n": 1.5, "s": "x"}},
        "not a dict": ["x"],
    }
    texts = {name: rejections_text(status) for name, status in cases.items()}
    assert texts == {"list": "-", "markup": "[/] 1, [bold red]x 2", "escape": "[2J]0;pwnedwiped 3, bidievil 4",
                     "types": "-", "not a dict": "-"}
    for text in texts.values():
        assert not any(ord(ch) < 32 or ch == "\x7f" for ch in text)
        assert text in rendered(text)  # shown as written, never parsed as markup
    many = rejections_text({"rejected": {f"r{i:03d}" + "x" * 100: i for i in range(100)}})
    assert many.endswith(", ... 76 more") and many.count(",") == 24 and "x" * 41 not in many
