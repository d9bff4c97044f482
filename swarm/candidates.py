"""The inbox's pool of admitted peer groups, indexed so admission stays O(1) per record.

One global cap bounds it, however many senders publish: when it is full, a newcomer takes the
place of the lowest-ranked candidate (newcomers first, then lowest credit, oldest round)
or, ranking no higher, is refused before its bytes are even parsed.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rollover.swarm.records import SharedGroup

POOL_CAP = 256  # candidates held at once, over all senders (a step judges at most 4 x J)

Rank = tuple[bool, float, int]  # (sender established, sender credit, round): lowest goes first


@dataclass
class Candidate:
    """A record that passed the arrival checks, with this node's own regeneration of its task."""

    sender: str
    round: int
    shared: SharedGroup
    record: dict[str, Any]
    digest: str
    completion_digests: tuple[str, ...] = ()
    contested: bool = False  # a later copy of it arrived: trained, but credit goes to no one
    seq: int = field(default=0, compare=False)


class CandidatePool:
    """Candidates in arrival order, with per-sender counts and a completion -> candidate index."""

    def __init__(self, cap: int = POOL_CAP):
        self.cap = cap
        self._items: dict[int, Candidate] = {}
        self._per_sender: Counter[str] = Counter()
        self._by_completion: dict[str, Candidate] = {}
        self._seq = itertools.count()
        self._lowest: tuple[Rank, Candidate] | None = None  # cached while ranks cannot change

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(list(self._items.values()))

    def count(self, sender: str) -> int:
        return self._per_sender[sender]

    def holding(self, completion_digest: str) -> Candidate | None:
        """The pooled candidate that holds this completion, if any."""
        return self._by_completion.get(completion_digest)

    def full(self) -> bool:
        return len(self._items) >= self.cap

    def add(self, candidate: Candidate) -> None:
        candidate.seq = next(self._seq)
        self._items[candidate.seq] = candidate
        self._per_sender[candidate.sender] += 1
        for digest in candidate.completion_digests:
            self._by_completion.setdefault(digest, candidate)
        self._lowest = None

    def remove(self, candidate: Candidate) -> None:
        if self._items.pop(candidate.seq, None) is None:
            return
        self._per_sender[candidate.sender] -= 1
        if self._per_sender[candidate.sender] <= 0:
            del self._per_sender[candidate.sender]
        for digest in candidate.completion_digests:
            if self._by_completion.get(digest) is candidate:
                del self._by_completion[digest]
        self._lowest = None

    def forget_before(self, oldest_round: int) -> None:
        for candidate in [c for c in self._items.values() if c.round < oldest_round]:
            self.remove(candidate)

    def lowest(self, rank: Callable[[Candidate], Rank]) -> tuple[Rank, Candidate] | None:
        """The lowest-ranked candidate and its rank (cached until the pool or `forget_ranks`)."""
        if self._lowest is None and self._items:
            self._lowest = min(((rank(c), c) for c in self._items.values()), key=lambda pair: pair[0])
        return self._lowest

    def forget_ranks(self) -> None:
        """Credit changed (a step judged some senders): ranks must be computed again."""
        self._lowest = None
