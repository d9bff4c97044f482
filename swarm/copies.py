"""Which completions this node has already seen, from whom: the swarm's copy check.

Keys are completion digests (records.completion_digest: this node's canonical spec of the task
plus the whitespace-normalised text), so a copy with another spelling of the spec, other spacing
or its completions shuffled into other groups is still the same completion. The memory spans
`span_rounds` rounds, far longer than a record lives, so a copy published rounds later is still
caught; it holds at most `max_entries` digests (oldest forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

COPY_MEMORY_ROUNDS = 64  # a record lives 2 rounds; a copier waiting this long gains little
COPY_MEMORY_ENTRIES = 131_072  # ~16 KB of digests per round at 500 admitted completions per round


class CopyMemory:
    """digest -> (first sender, round), for the last `span_rounds` rounds."""

    def __init__(self, span_rounds: int = COPY_MEMORY_ROUNDS, max_entries: int = COPY_MEMORY_ENTRIES):
        self.span_rounds, self.max_entries = span_rounds, max_entries
        self._owners: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, digest: str) -> str | None:
        """Who sent `digest` first (within the memory), or None."""
        seen = self._owners.get(digest)
        return seen[0] if seen is not None else None

    def split(self, digests: Iterable[str], sender: str) -> tuple[set[str], set[str]]:
        """(digests first seen from other senders, digests already seen from `sender`)."""
        others, own = set(), set()
        for digest in digests:
            owner = self.owner(digest)
            if owner is not None:
                (own if owner == sender else others).add(digest)
        return others, own

    def note(self, digests: Iterable[str], sender: str, round_index: int) -> None:
        """Remember `sender` as the first sender of each digest not seen before."""
        for digest in digests:
            if digest not in self._owners:
                self._owners[digest] = (sender, round_index)
        while len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)

    def forget_before(self, current_round: int) -> None:
        """Drop digests older than the span (entries are in arrival order, about round order)."""
        oldest = current_round - self.span_rounds
        while self._owners:
            digest, (_, round_index) = next(iter(self._owners.items()))
            if round_index >= oldest:
                break
            del self._owners[digest]

    def state_dict(self) -> dict[str, Any]:
        return {"owners": [[d, s, r] for d, (s, r) in self._owners.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._owners = OrderedDict((d, (s, r)) for d, s, r in state["owners"])
