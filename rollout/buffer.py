"""The partial-rollout buffer: groups waiting to be resumed in a later step.

It holds unfinished groups (aborted at the end of a step, with the tokens and log-probs streamed
so far) and surplus finished groups (scored or not). Groups leave oldest first, oldest meaning
drawn first (lowest uid). Staleness is measured from the per-token policy versions, so it
survives a checkpoint/restart with the buffer's state dict.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rollover.rollout.types import Group


def group_age(group: Group, current_version: int) -> int:
    """Versions between the group's oldest token and now (0 for a group with no tokens)."""
    oldest = group.oldest_version()
    return 0 if oldest is None else max(0, current_version - oldest)


class PartialBuffer:
    """uid -> Group, popped in draw order."""

    def __init__(self) -> None:
        self._groups: dict[int, Group] = {}

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

    def pop_oldest(self) -> Group | None:
        """The group drawn first, removed from the buffer; None when empty."""
        if not self._groups:
            return None
        return self._groups.pop(min(self._groups))

    def take_stale(self, current_version: int, max_staleness: int) -> list[Group]:
        """Remove and return groups whose oldest token is more than `max_staleness` versions old."""
        stale = [u for u, g in self._groups.items() if group_age(g, current_version) > max_staleness]
        return [self._groups.pop(u) for u in sorted(stale)]

    def staleness_histogram(self, current_version: int) -> dict[int, int]:
        """Buffered groups counted by age in versions."""
        return dict(sorted(Counter(group_age(g, current_version) for g in self._groups.values()).items()))

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_state() for g in self.groups()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._groups = {}
        for g in state["groups"]:
            self.put(Group.from_state(g))
