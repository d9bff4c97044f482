"""The built-in arithmetic task: multi-operand addition with a worked column scratchpad.

Problems are a pure function of (seed, index), so any process (a resumed run, a swarm peer)
regenerates the same problem from its spec. The scratchpad has one step per column, so
completion length grows with the number of digits and operands, the way reasoning rollouts vary.

    question: 47+85=
    solution: 7+5=12;4+8+1=13;#132
"""

from __future__ import annotations

import random
import re

ANSWER_MARK = "#"
_ANSWER_RE = re.compile(r"#\s*(-?\d+)")


def make_problem(
    seed: int, index: int, digits_min: int, digits_max: int, operands: int
) -> list[int]:
    """The operands of problem `index` in the stream `seed` (deterministic across processes)."""
    rng = random.Random(f"arithmetic:{seed}:{index}")
    digits = rng.randint(digits_min, digits_max)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return [rng.randint(low, 10**digits - 1) for _ in range(operands)]


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
    seed: int, index: int, digits_min: int, digits_max: int, operands: int, with_scratchpad: bool
) -> dict:
    """A task record: question, answer and the spec that regenerates it."""
    numbers = make_problem(seed, index, digits_min, digits_max, operands)
    return {
        "question": question_text(numbers),
        "answer": str(sum(numbers)),
        "solution": solution_text(numbers, with_scratchpad),
        "spec": {"task": "arithmetic", "seed": seed, "index": index, "digits_min": digits_min,
                 "digits_max": digits_max, "operands": operands},
    }
