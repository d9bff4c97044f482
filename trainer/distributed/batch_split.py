"""A mini-batch's rows over data-parallel ranks, balanced by tokens (pure, deterministic).

Every rank holds the whole step's rows and computes the same split, so no rank has to be told
which rows are its own; group advantages are already on the rows (computed before the split).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_by_tokens(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Row indices per part, each part's in ascending order: longest row first, each to the part
    with the fewest tokens so far (ties: fewer rows, then the lower part index).

    Greedy longest-first keeps every part within one row's length of the others' mean. A part
    may be empty when there are fewer rows than parts.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    tokens = [0] * parts
    owned: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        part = min(range(parts), key=lambda p: (tokens[p], len(owned[p]), p))
        tokens[part] += lengths[index]
        owned[part].append(index)
    return [sorted(indices) for indices in owned]


def rank_share(rows: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The rows `rank` trains on out of `rows` (anything with a `length`), in their given order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    indices = split_by_tokens([row.length for row in rows], world_size)[rank]
    return [rows[i] for i in indices]
