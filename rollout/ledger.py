"""The conservation ledger: where every drawn prompt is (docs/ARCHITECTURE.md, "Conservation").

Every uid drawn from the prompt source is in exactly one place: in flight, in the partial
buffer, returned in a training batch, or dropped with a counted reason. Moves are checked
(a uid cannot be drawn twice, and returned or dropped are final), so a scheduler bug that
loses or duplicates a group fails loudly instead of skewing training.

The scheduler checks the ledger after every step, so the two places that stay small (in flight,
buffered) are also kept as sets: the check costs O(groups in flight and buffered), not
O(every prompt drawn since the run began).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

IN_FLIGHT, BUFFERED, RETURNED, DROPPED = "in_flight", "buffered", "returned", "dropped"
PLACES = (IN_FLIGHT, BUFFERED, RETURNED, DROPPED)
_LEGAL = {
    IN_FLIGHT: {BUFFERED, RETURNED, DROPPED},
    BUFFERED: {IN_FLIGHT, DROPPED},
    RETURNED: set(),
    DROPPED: set(),
}


class LedgerError(RuntimeError):
    """A conservation violation: a uid drawn twice, lost, or moved illegally."""


class Ledger:
    """uid -> place, plus the reason for every drop."""

    def __init__(self) -> None:
        self._place: dict[int, str] = {}
        self._reason: dict[int, str] = {}
        self._open: dict[str, set[int]] = {IN_FLIGHT: set(), BUFFERED: set()}  # = uids(place)

    def draw(self, uid: int) -> None:
        """A fresh prompt enters: it starts in flight."""
        if uid in self._place:
            raise LedgerError(f"uid {uid} drawn twice (it is {self._place[uid]})")
        self._place[uid] = IN_FLIGHT
        self._open[IN_FLIGHT].add(uid)

    def move(self, uid: int, place: str, reason: str | None = None, *, returned_back: bool = False) -> None:
        """Move a drawn uid; drops need a reason.

        `returned_back`: a returned group the trainer never trained on goes back to the buffer
        (a batch produced ahead of the trainer, given back before a checkpoint).
        """
        if place not in PLACES:
            raise LedgerError(f"unknown place {place!r}")
        current = self._place.get(uid)
        if current is None:
            raise LedgerError(f"uid {uid} was never drawn")
        if returned_back and current == RETURNED and place == BUFFERED:
            self._set(uid, current, place)
            return
        if place not in _LEGAL[current]:
            raise LedgerError(f"uid {uid}: illegal move {current} -> {place}")
        if place == DROPPED:
            if not reason:
                raise LedgerError(f"uid {uid}: a drop needs a reason")
            self._reason[uid] = reason
        self._set(uid, current, place)

    def _set(self, uid: int, current: str, place: str) -> None:
        self._place[uid] = place
        if current in self._open:
            self._open[current].discard(uid)
        if place in self._open:
            self._open[place].add(uid)

    def place(self, uid: int) -> str | None:
        return self._place.get(uid)

    def uids(self, place: str) -> set[int]:
        if place in self._open:
            return set(self._open[place])
        return {u for u, p in self._place.items() if p == place}

    def drop_reasons(self) -> Counter:
        """Drops counted by reason (filtered, stale, prompt_too_long, ...)."""
        return Counter(self._reason.values())

    def counts(self) -> dict[str, int]:
        """How many uids are in each place, plus the total drawn."""
        c = Counter(self._place.values())
        return {"drawn": len(self._place), **{p: c.get(p, 0) for p in PLACES}}

    def check(self, in_flight: set[int], buffered: set[int]) -> None:
        """Raise LedgerError unless the ledger agrees with what is really in flight / buffered."""
        for place, actual in ((IN_FLIGHT, in_flight), (BUFFERED, buffered)):
            recorded = self.uids(place)
            if recorded != set(actual):
                raise LedgerError(
                    f"{place}: ledger has {sorted(recorded - set(actual))} extra, "
                    f"{sorted(set(actual) - recorded)} missing"
                )

    def state_dict(self) -> dict[str, Any]:
        return {"place": {str(u): p for u, p in self._place.items()},
                "reason": {str(u): r for u, r in self._reason.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        place = {int(u): p for u, p in state["place"].items()}
        if IN_FLIGHT in place.values():
            raise LedgerError("a saved ledger must not have groups in flight (save between steps)")
        self._place = place
        self._reason = {int(u): r for u, r in state["reason"].items()}
        self._open = {p: {u for u, q in place.items() if q == p} for p in (IN_FLIGHT, BUFFERED)}
