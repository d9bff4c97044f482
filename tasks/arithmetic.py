"""The built-in arithmetic task: multi-operand addition with a worked column scratchpad.

Problems are a pure function of (seed, index), so any process (a resumed run, a swarm peer)
regenerates the same problem from its spec. The scratchpad has one step per column, so
completion length grows with the number of digits and operands, the way reasoning rollouts vary.
With `operands_max` each problem also draws its operand count; the length (about digits x
operands) is then right-skewed: many short solutions and a long tail of long ones.

    question: 47+85=
    solution: 7+5=12;4+8+1=13;#132
"""

from __future__ import annotations

import random
import re

ANSWER_MARK = "#"
_ANSWER_RE = re.compile(r"#\s*(-?\d+)")


def make_problem(
    seed: int, index: int, digits_min: int, digits_max: int, operands: int,
    operands_max: int | None = None,
) -> list[int]:
    """The operands of problem `index` in the stream `seed` (deterministic across processes).

    All operands share one digit count drawn from digits_min..digits_max. Their number is
    `operands`, or with `operands_max` drawn from operands..operands_max; a fixed count draws
    nothing extra, so those streams are the same as before the option existed.
    """
    if operands_max is not None and operands_max < operands:
        raise ValueError(f"operands_max {operands_max} is less than operands {operands}")
    rng = random.Random(f"arithmetic:{seed}:{index}")
    digits = rng.randint(digits_min, digits_max)
    count = rng.randint(operands, operands_max) if _variable(operands, operands_max) else operands
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return [rng.randint(low, 10**digits - 1) for _ in range(count)]


def _variable(operands: int, operands_max: int | None) -> bool:
    """Whether the operand count is drawn per problem (an equal maximum means a fixed count)."""
    return operands_max is not None and operands_max != operands


def question_text(numbers: list[int]) -> str:
    return "+".join(str(n) for n in numbers) + "="


def scratchpad(numbers: list[int]) -> str:
    """Column addition from the units up: `a+b[+carry]=sum;` per column."""
    width = max(len(str(n)) for n in numbers)
    steps, carry = [], 0
    for column in range(width):
        digits = [n // 10**column % 10 for n in numbers if column < len(str(n))]
        terms = digits + ([carry] if carry else [])
        total = sum(terms)
        steps.append("+".join(map(str, terms)) + f"={total};")
        carry = total // 10
    return "".join(steps)


def solution_text(numbers: list[int], with_scratchpad: bool = True) -> str:
    """The reference completion: scratchpad (optional), then `#answer`."""
    pad = scratchpad(numbers) if with_scratchpad else ""
    return f"{pad}{ANSWER_MARK}{sum(numbers)}"


# One scratchpad step: "7+5=12;" (spaces allowed around the signs).
_STEP_RE = re.compile(r"\s*(\d+(?:\s*\+\s*\d+)*)\s*=\s*(\d+)\s*;")


def column_steps(numbers: list[int]) -> list[tuple[list[int], int]]:
    """The (terms, sum) of each column step of `scratchpad(numbers)`, units first."""
    width = max(len(str(n)) for n in numbers)
    steps, carry = [], 0
    for column in range(width):
        terms = [n // 10**column % 10 for n in numbers if column < len(str(n))] + ([carry] if carry else [])
        steps.append((terms, sum(terms)))
        carry = sum(terms) // 10
    return steps


def steps_are_right(completion: str, numbers: list[int]) -> bool:
    """Whether everything before the answer mark is the worked column addition of `numbers`,
    step by step (the right digits, carries and sums): a right answer after a wrong or missing
    working does not pass. Linear in the completion's length."""
    working = completion.split(ANSWER_MARK, 1)[0]
    steps, position = [], 0
    while True:
        match = _STEP_RE.match(working, position)
        if match is None:
            break
        terms, total = match.group(1), match.group(2)
        if len(total) > 64 or len(terms) > 4096:
            return False  # no real step is that long; int() of it would be slow
        steps.append(([int(t) for t in terms.split("+")], int(total)))
        position = match.end()
    if working[position:].strip():
        return False  # something else than steps in the working
    return steps == column_steps(numbers)


def question_numbers(question: str) -> list[int]:
    """The operands of a question as `question_text` writes it ("47+85=")."""
    return [int(n) for n in question.rstrip("=").split("+")]


def extract_answer(completion: str) -> int | None:
    """The integer after the first `#`, or None when the completion gives no answer."""
    match = _ANSWER_RE.search(completion)
    return int(match.group(1)) if match else None


def arithmetic_record(
    seed: int, index: int, digits_min: int, digits_max: int, operands: int, with_scratchpad: bool,
    operands_max: int | None = None,
) -> dict:
    """A task record: question, answer and the spec that regenerates it.

    The spec names `operands_max` only when the count varies, so fixed-count specs are unchanged.
    """
    numbers = make_problem(seed, index, digits_min, digits_max, operands, operands_max)
    spec = {"task": "arithmetic", "seed": seed, "index": index, "digits_min": digits_min,
            "digits_max": digits_max, "operands": operands}
    if _variable(operands, operands_max):
        spec["operands_max"] = operands_max
    return {
        "question": question_text(numbers),
        "answer": str(sum(numbers)),
        "solution": solution_text(numbers, with_scratchpad),
        "spec": spec,
    }
