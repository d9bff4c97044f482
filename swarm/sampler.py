"""Which external groups a node trains on: per-sender credit and per-sender share caps.

A sender earns credit when the groups it sent turned out informative and held at least one
completion this node verified correct; it loses it when they did not (or were rejected).
Sampling (swarm/receive.py, `Inbox.take`) is weighted by credit, so a peer that wastes our compute gets picked less and less,
and no sender fills more than its share of a step however much it publishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SenderCredit:
    """Useful / judged groups per sender, with a uniform prior (a newcomer starts at 1/2)."""

    useful: dict[str, int] = field(default_factory=dict)
    judged: dict[str, int] = field(default_factory=dict)

    def record(self, sender: str, useful: bool) -> None:
        self.judged[sender] = self.judged.get(sender, 0) + 1
        self.useful[sender] = self.useful.get(sender, 0) + int(useful)

    def credit(self, sender: str) -> float:
        """(useful + 1) / (judged + 2): Laplace's rule of succession, in (0, 1)."""
        return (self.useful.get(sender, 0) + 1) / (self.judged.get(sender, 0) + 2)

    def state_dict(self) -> dict[str, Any]:
        return {"useful": dict(self.useful), "judged": dict(self.judged)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.useful, self.judged = dict(state["useful"]), dict(state["judged"])


def per_sender_cap(count: int, max_share: float) -> int:
    """Most items of `count` one sender may fill (at least one, so a lone peer is still heard)."""
    return max(1, math.floor(count * max_share + 1e-9))
