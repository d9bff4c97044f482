"""GSM8K-style word problems: small-number arithmetic told as stories, with worked solutions.

The task a real instruct model is trained on, shrunk to what a few-M-parameter model can learn:
a few story templates with names and objects, one or two operations (+, -, x) on small
numbers, and a short worked solution ending in GSM8K's `#### N`. Problems are a pure function of
(seed, index), like the arithmetic task, and the shipped JSONL files are written from two fixed
streams, so `python -m rollover.tasks.word_problems --out DIR` rewrites them byte for byte.

    question: Mia has 7 apples. She buys 5 more. How many apples does Mia have now?
    answer:   Mia has 7 + 5 = 12 apples.
              #### 12

The files train `builtin:chat-math` and `recipes/grpo_chat.yaml` through the `dataset` task
(`task.path: builtin:word-problems`, see tasks/registry.py).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
TRAIN_FILE, TEST_FILE = "word_problems_train.jsonl", "word_problems_test.jsonl"
TRAIN_SEED, TEST_SEED = 0, 1
TRAIN_ROWS, TEST_ROWS = 2000, 500
# The system prompt the warm start was trained with; recipes/grpo_chat.yaml uses the same text.
SYSTEM_PROMPT = "Solve the problem. End with the answer as #### N."

NAMES = [("Mia", "She", "her"), ("Tom", "He", "him"), ("Ana", "She", "her"), ("Ben", "He", "him"),
         ("Lily", "She", "her"), ("Sam", "He", "him"), ("Zoe", "She", "her"), ("Max", "He", "him"),
         ("Emma", "She", "her"), ("Leo", "He", "him"), ("Nora", "She", "her"), ("Jack", "He", "him")]
OBJECTS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells",
           "cards", "coins", "flowers", "toys"]
CONTAINERS = ["bags", "boxes", "packs", "jars"]


def _add(rng: random.Random, who, other, obj: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    name, pron, _ = who
    return (f"{name} has {a} {obj}. {pron} buys {b} more. How many {obj} does {name} have now?",
            f"{name} has {a} + {b} = {a + b} {obj}.", a + b)


def _sub(rng: random.Random, who, other, obj: str) -> tuple[str, str, int]:
    a = rng.randint(5, 30)
    b = rng.randint(1, a - 1)
    name = who[0]
    return (f"{name} had {a} {obj} and gave {b} to {other[0]}. How many {obj} does {name} have left?",
            f"{name} has {a} - {b} = {a - b} {obj} left.", a - b)


def _mul(rng: random.Random, who, other, obj: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    name, box = who[0], rng.choice(CONTAINERS)
    return (f"{name} buys {a} {box} with {b} {obj} in each. How many {obj} does {name} buy?",
            f"{name} buys {a} * {b} = {a * b} {obj}.", a * b)


def _add_sub(rng: random.Random, who, other, obj: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    c = rng.randint(1, a + b - 1)
    name, pron, obj_pron = who
    return (f"{name} has {a} {obj}. {other[0]} gives {obj_pron} {b} more, then {pron.lower()} "
            f"loses {c}. How many {obj} does {name} have now?",
            f"{name} has {a} + {b} = {a + b} {obj}.\nThen {a + b} - {c} = {a + b - c} {obj}.",
            a + b - c)


def _more_than(rng: random.Random, who, other, obj: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 15), rng.randint(1, 10)
    name, other_name = who[0], other[0]
    return (f"{name} has {a} {obj}. {other_name} has {b} more {obj} than {name}. "
            f"How many {obj} do they have together?",
            f"{other_name} has {a} + {b} = {a + b} {obj}.\nTogether they have {a} + {a + b} = "
            f"{2 * a + b} {obj}.", 2 * a + b)


def _mul_add(rng: random.Random, who, other, obj: str) -> tuple[str, str, int]:
    a, b, c = rng.randint(2, 6), rng.randint(2, 6), rng.randint(1, 9)
    name, box = who[0], rng.choice(CONTAINERS)
    return (f"{name} has {a} {box} of {b} {obj} and {c} more {obj}. How many {obj} does {name} have?",
            f"{name} has {a} * {b} = {a * b} {obj} in {box}.\nThen {a * b} + {c} = {a * b + c} {obj}.",
            a * b + c)


TEMPLATES = [_add, _sub, _mul, _add_sub, _more_than, _mul_add]


def word_problem(seed: int, index: int) -> dict[str, str]:
    """Problem `index` of stream `seed`: GSM8K's `question`/`answer` keys, answer ending `#### N`."""
    rng = random.Random(f"word_problems:{seed}:{index}")
    template = rng.choice(TEMPLATES)
    who, other = rng.sample(NAMES, 2)
    question, working, answer = template(rng, who, other, rng.choice(OBJECTS))
    return {"question": question, "answer": f"{working}\n#### {answer}"}


def write_files(out: Path) -> dict[str, int]:
    """Write the train and test files into `out`; test questions never appear in train."""
    train = [word_problem(TRAIN_SEED, i) for i in range(TRAIN_ROWS)]
    seen = {row["question"] for row in train}
    test, index = [], 0
    while len(test) < TEST_ROWS:
        row = word_problem(TEST_SEED, index)
        index += 1
        if row["question"] not in seen:
            seen.add(row["question"])
            test.append(row)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in ((TRAIN_FILE, train), (TEST_FILE, test)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {TRAIN_FILE: len(train), TEST_FILE: len(test)}


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollover.tasks.word_problems",
                                     description="Write the word-problem train and test files.")
    parser.add_argument("--out", default=str(DATA_DIR), help=f"folder to write (default {DATA_DIR})")
    args = parser.parse_args(argv)
    for name, count in write_files(Path(args.out)).items():
        print(f"{count} rows -> {Path(args.out) / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
