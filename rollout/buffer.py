"""The partial-rollout buffer: groups waiting to be resumed in a later step.

It holds unfinished groups (aborted at the end of a step, with the tokens and log-probs streamed
so far) and surplus finished groups (scored or not). Groups leave oldest first, oldest meaning
drawn first (lowest uid). Staleness is measured from the per-token policy versions, so it
survives a checkpoint/restart with the buffer's state dict.

Costs: `put` and `pop_oldest` are O(log n) (a heap of uids beside the uid -> group map; the
scheduler pops once per group it launches, with thousands buffered at scale); what runs once
per step (`take_stale`, `groups`, the histogram, the state dict) is O(n). Each group's oldest
token version is read once, when it is put: a buffered group's tokens do not change (a step
that was cancelled may still drop tokens of unknown version from a group it filed, which can
only make it younger, so `take_stale` checks its candidates again before dropping them).
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any

from rollover.rollout.types import Group


def oldest_version(group: Group) -> int | None:
    """`Group.oldest_version()`, without building the list of every token's version."""
    return min((min(s.versions) for s in group.samples if s.versions), default=None)


def _age(oldest: int | None, current_version: int) -> int:
    return 0 if oldest is None else max(0, current_version - oldest)


def group_age(group: Group, current_version: int) -> int:
    """Versions between the group's oldest token and now (0 for a group with no tokens)."""
    return _age(oldest_version(group), current_version)


class PartialBuffer:
    """uid -> Group, popped in draw order."""

    def __init__(self) -> None:
        self._groups: dict[int, Group] = {}
        self._order: list[int] = []  # a heap of exactly the uids in `_groups`
        self._oldest: dict[int, int | None] = {}  # uid -> oldest token version when put

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, uid: int) -> bool:
        return uid in self._groups

    def uids(self) -> set[int]:
        return set(self._groups)

    def groups(self) -> list[Group]:
        """The buffered groups, oldest first (read-only view; use pop to take one)."""
        return [self._groups[u] for u in sorted(self._groups)]

    def put(self, group: Group) -> None:
        if group.uid in self._groups:
            raise ValueError(f"group {group.uid} is already buffered")
        self._groups[group.uid] = group
        self._oldest[group.uid] = oldest_version(group)
        heapq.heappush(self._order, group.uid)

    def pop_oldest(self) -> Group | None:
        """The group drawn first, removed from the buffer; None when empty."""
        if not self._order:
            return None
        uid = heapq.heappop(self._order)
        del self._oldest[uid]
        return self._groups.pop(uid)

    def take_stale(self, current_version: int, max_staleness: int) -> list[Group]:
        """Remove and return groups whose oldest token is more than `max_staleness` versions old."""
        stale = [u for u, v in self._oldest.items() if _age(v, current_version) > max_staleness
                 and group_age(self._groups[u], current_version) > max_staleness]
        if not stale:
            return []
        for u in stale:
            del self._oldest[u]
        taken = [self._groups.pop(u) for u in sorted(stale)]
        self._order = list(self._groups)
        heapq.heapify(self._order)
        return taken

    def staleness_histogram(self, current_version: int) -> dict[int, int]:
        """Buffered groups counted by age in versions (as they were put)."""
        ages: Counter = Counter()
        for oldest, n in Counter(self._oldest.values()).items():  # a few distinct versions
            ages[_age(oldest, current_version)] += n
        return dict(sorted(ages.items()))

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_state() for g in self.groups()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._groups, self._order, self._oldest = {}, [], {}
        for g in state["groups"]:
            self.put(Group.from_state(g))
