"""Which external groups a node trains on: per-sender credit and per-sender share caps.

A sender earns credit when the groups it sent turned out informative and held at least one
completion this node verified correct; it loses it when they did not (or were rejected).
Sampling (swarm/inbox.py, `Inbox.take`) is weighted by credit, so a peer that wastes our compute gets picked less and less,
and no sender fills more than its share of a step however much it publishes.

Keys are free, so credit is earned, never granted, and slowly: every sender not yet
*established* (useful groups in ESTABLISHED_ROUNDS distinct rounds) is a newcomer, and newcomers
share ONE prior between them (`draw_weights`) and at most NEWCOMER_SHARE of a step's slots
while an established sender's groups wait (`newcomer_slots`, Inbox.take). A thousand fresh keys
weigh together what one newcomer weighs and fill together what one newcomer may fill; an honest
newcomer still earns its way in, one round at a time, through those shared slots. Once
established, a sender weighs its credit times its seniority (useful rounds over SENIOR_ROUNDS):
keys a flood carried to establishment weigh a quarter each, not what a peer useful for longer weighs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any


ESTABLISHED_ROUNDS = 4  # rounds with a useful group before a sender is established
SENIOR_ROUNDS = 4 * ESTABLISHED_ROUNDS  # useful rounds before an established sender weighs its full credit
KEEP_TOP = 256  # senders whose credit is kept for its height (top credit first)
KEEP_RECENT = 256  # and senders kept for being judged lately (so newcomers can build credit)
TRIM_AT = (KEEP_TOP + KEEP_RECENT) * 5 // 4  # senders held before trimming (trims are rare)


@dataclass
class SenderCredit:
    """Useful / judged groups per sender, with a uniform prior (a newcomer starts at 1/2), and the
    rounds in which each sender's groups were useful.

    Credit accrues slowly: a sender is *established* only after useful groups in
    ESTABLISHED_ROUNDS distinct rounds, however many it sends per round (a horde of new keys
    cannot buy that with volume). Bounded: past KEEP_TOP + KEEP_RECENT senders the rest are
    forgotten (`_trim`) and revert to the shared prior; checkpoints do not grow with keys seen.
    """

    useful: dict[str, int] = field(default_factory=dict)
    judged: dict[str, int] = field(default_factory=dict)
    rounds: dict[str, list[int]] = field(default_factory=dict)  # useful rounds (the last SENIOR_ROUNDS)

    def record(self, sender: str, useful: bool, round_index: int | None = None) -> None:
        """A verdict on one of `sender`'s groups, from `round_index` (None: a round of its own)."""
        self.judged[sender] = self.judged.pop(sender, 0) + 1  # re-inserted: dicts keep recency order
        self.useful[sender] = self.useful.get(sender, 0) + int(useful)
        if useful:
            seen = self.rounds.setdefault(sender, [])
            if round_index is None or round_index not in seen:
                seen.append(round_index if round_index is not None else (seen[-1] + 1 if seen else 0))
                del seen[:-SENIOR_ROUNDS]
        if len(self.judged) > TRIM_AT:
            self._trim()

    def credit(self, sender: str) -> float:
        """(useful + 1) / (judged + 2): Laplace's rule of succession, in (0, 1)."""
        return (self.useful.get(sender, 0) + 1) / (self.judged.get(sender, 0) + 2)

    def is_new(self, sender: str) -> bool:
        """Never judged here (or forgotten)."""
        return sender not in self.judged

    def is_proven(self, sender: str) -> bool:
        """At least one of its groups was useful here."""
        return self.useful.get(sender, 0) > 0

    def is_established(self, sender: str) -> bool:
        """Useful groups in ESTABLISHED_ROUNDS distinct rounds, and credit above the prior."""
        return len(self.rounds.get(sender, ())) >= ESTABLISHED_ROUNDS and self.credit(sender) > PRIOR

    def seniority(self, sender: str) -> float:
        """Distinct useful rounds over SENIOR_ROUNDS, at most 1: keys made for a flood can buy
        establishment in ESTABLISHED_ROUNDS rounds, never the weight of a peer useful for longer."""
        return min(1.0, len(self.rounds.get(sender, ())) / SENIOR_ROUNDS)

    def top(self, k: int) -> list[tuple[str, float]]:
        """The k senders with the highest credit (ties: more judged first), for metrics and status:
        what a node reports about its peers stays the same size however many keys it has seen."""
        ranked = heapq.nsmallest(k, self.judged, key=lambda s: (-self.credit(s), -self.judged[s], s))
        return [(s, self.credit(s)) for s in ranked]

    def _trim(self) -> None:
        """Keep the KEEP_TOP senders of highest credit and the KEEP_RECENT judged last."""
        keep = {s for s, _ in self.top(KEEP_TOP)}
        keep.update(list(self.judged)[-KEEP_RECENT:])
        for table in (self.judged, self.useful, self.rounds):
            for sender in [s for s in table if s not in keep]:
                del table[sender]

    def state_dict(self) -> dict[str, Any]:
        return {"useful": dict(self.useful), "judged": dict(self.judged),
                "rounds": {s: list(r) for s, r in self.rounds.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.useful, self.judged = dict(state["useful"]), dict(state["judged"])
        # checkpoints before rounds were kept: each useful group counted as a round of its own
        self.rounds = {s: list(r) for s, r in state.get("rounds", {}).items()} if "rounds" in state else \
            {s: list(range(min(n, SENIOR_ROUNDS))) for s, n in self.useful.items() if n > 0}
        if len(self.judged) > TRIM_AT:
            self._trim()


PRIOR = 0.5  # the credit of a sender never judged; all newcomers share this much weight
NEWCOMER_SHARE = 0.25  # of a step's external slots, newcomers' together (while established wait)


def draw_weights(senders: list[str], credit: SenderCredit) -> list[float]:
    """A drawing weight per entry of `senders` (one entry per pooled group).

    Each established sender's groups together weigh its credit times its seniority (a peer
    useful for SENIOR_ROUNDS rounds weighs its full credit), however many it pooled; all
    other senders (newcomers, unproven or not yet established) together weigh PRIOR, split in
    proportion to their credits: a thousand keys weigh what one newcomer weighs.
    """
    counts: dict[str, int] = {}
    for sender in senders:
        counts[sender] = counts.get(sender, 0) + 1
    newcomers = {s: credit.credit(s) for s in counts if not credit.is_established(s)}
    total = sum(newcomers.values())
    scale = PRIOR / total if total > 0 else 1.0
    per_sender = {s: (newcomers[s] * scale if s in newcomers else credit.credit(s) * credit.seniority(s))
                  for s in counts}
    return [per_sender[s] / counts[s] for s in senders]


def newcomer_slots(count: int) -> int:
    """Most of `count` slots newcomers fill together while established senders' groups wait."""
    return max(1, math.floor(count * NEWCOMER_SHARE + 1e-9))


def per_sender_cap(count: int, max_share: float) -> int:
    """Most items of `count` one sender may fill (at least one, so a lone peer is still heard)."""
    return max(1, math.floor(count * max_share + 1e-9))
