"""Which external groups a node trains on: per-sender credit and per-sender share caps.

A sender earns credit when the groups it sent turned out informative and held at least one
completion this node verified correct; it loses it when they did not (or were rejected).
Sampling (swarm/receive.py, `Inbox.take`) is weighted by credit, so a peer that wastes our compute gets picked less and less,
and no sender fills more than its share of a step however much it publishes.

Keys are free, so credit is earned, never granted: every sender that has not yet sent one
useful group ("unproven", newcomers included) shares ONE prior between them (`draw_weights`).
A thousand fresh keys weigh together what one newcomer weighs; they cannot crowd out a peer
whose groups have proved useful.
"""

from __future__ import annotations

import heapq
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

    def is_new(self, sender: str) -> bool:
        """Never judged here."""
        return sender not in self.judged

    def is_proven(self, sender: str) -> bool:
        """At least one of its groups was useful here."""
        return self.useful.get(sender, 0) > 0

    def top(self, k: int) -> list[tuple[str, float]]:
        """The k senders with the highest credit (ties: more judged first), for metrics and status:
        what a node reports about its peers stays the same size however many keys it has seen."""
        ranked = heapq.nsmallest(k, self.judged, key=lambda s: (-self.credit(s), -self.judged[s], s))
        return [(s, self.credit(s)) for s in ranked]

    def state_dict(self) -> dict[str, Any]:
        return {"useful": dict(self.useful), "judged": dict(self.judged)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.useful, self.judged = dict(state["useful"]), dict(state["judged"])


PRIOR = 0.5  # the credit of a sender never judged; all unproven senders share this much weight


def draw_weights(senders: list[str], credit: SenderCredit) -> list[float]:
    """A drawing weight per entry of `senders` (one entry per pooled group).

    Each sender's groups together weigh its credit, however many it pooled; unproven senders
    together weigh at most PRIOR, split in proportion to their credits.
    """
    counts: dict[str, int] = {}
    for sender in senders:
        counts[sender] = counts.get(sender, 0) + 1
    unproven = {s: credit.credit(s) for s in counts if not credit.is_proven(s)}
    total_unproven = sum(unproven.values())
    scale = min(1.0, PRIOR / total_unproven) if total_unproven > 0 else 1.0
    per_sender = {s: (unproven[s] * scale if s in unproven else credit.credit(s)) for s in counts}
    return [per_sender[s] / counts[s] for s in senders]


def per_sender_cap(count: int, max_share: float) -> int:
    """Most items of `count` one sender may fill (at least one, so a lone peer is still heard)."""
    return max(1, math.floor(count * max_share + 1e-9))
