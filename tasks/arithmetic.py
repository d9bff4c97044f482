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
