"""A node's inbox of peers' records: cheap checks on arrival, costly ones only for what it trains.

Arrival (`admit`): schema and caps, signed round against the key's round, per-peer counts,
copies (group digests), and regeneration of the task from its spec with this node's registry.
What passes waits in a pool for at most two rounds.

Training (`take`): groups are drawn from the pool by sender credit, each rebuilt and judged by
this node alone (`Judge`: re-tokenise, re-score, likelihood under its own policy), until J
pass. A peer can spend our compute only up to the caps; it cannot choose what we score against.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from rollover.rollout.types import Group
from rollover.swarm.records import Caps, Rejected, SharedGroup, decode_group, group_digest
from rollover.swarm.sampler import SenderCredit, per_sender_cap
from rollover.tasks.registry import SpecError, Task, record_from_spec

ROUNDS_KEPT = 2  # a record is usable in its own round and the next: publishers finish late


@dataclass(frozen=True)
class Incoming:
    """One value as the transport read it: who signed it, under which round's key, which slot."""

    sender: str
    round: int
    index: int
    raw: Any


@dataclass
class Candidate:
    """A record that passed the arrival checks, with this node's own regeneration of its task."""

    sender: str
    round: int
    shared: SharedGroup
    record: dict[str, Any]
    digest: str


class Judge(Protocol):
    """What the trainer side provides: the node's tokenizer, verifier and policy."""

    def build_group(self, record: dict[str, Any], completions: list[str], sender: str) -> Group:
        """Re-tokenised (capped at max_tokens) and re-scored with this node's own reward."""

    def mean_logprobs(self, group: Group) -> list[float]:
        """Per-token mean log-likelihood of each sample under this node's current policy."""


class Inbox:
    """Admits, pools and judges peers' records; counts every rejection by reason."""

    def __init__(self, task: Task, caps: Caps, likelihood_z: float, min_reference: int = 16):
        self.task, self.caps, self.likelihood_z = task, caps, likelihood_z
        self.min_reference = min_reference
        self.rejected: Counter[str] = Counter()
        self.received = 0  # distinct records read from peers, over the run
        self.pool: list[Candidate] = []
        self._handled: dict[tuple[str, int, int], int] = {}  # (sender, round, index) -> round
        self._digests: dict[str, tuple[str, int]] = {}  # group digest -> (first sender, round)
        self._per_round: Counter[tuple[str, int]] = Counter()  # admitted records per (sender, round)
        self.reference: deque[float] = deque(maxlen=512)  # own samples' mean log-probs

    # ---- arrival -------------------------------------------------------------------------------

    def note_own(self, sender: str, round_index: int, spec: dict[str, Any], completions: list[str]) -> None:
        """Our own published group: a peer echoing it back is a copy."""
        self._digests.setdefault(group_digest(spec, completions), (sender, round_index))

    def note_reference(self, values: Iterable[float]) -> None:
        """Mean log-probs of our own samples under our own policy (the behaviour log-probs)."""
        self.reference.extend(values)

    def admit(self, incoming: Iterable[Incoming], current_round: int) -> int:
        """Check newly read records; returns how many joined the pool."""
        self._forget_before(current_round - ROUNDS_KEPT + 1)
        admitted = 0
        for item in incoming:
            key = (item.sender, item.round, item.index)
            if key in self._handled:
                continue  # read again on a later poll: judged once
            self._handled[key] = item.round
            self.received += 1
            try:
                self.pool.append(self._check(item, current_round))
                admitted += 1
            except Rejected as exc:
                self.rejected[exc.reason] += 1
        return admitted

    def _check(self, item: Incoming, current_round: int) -> Candidate:
        if item.round > current_round:
            raise Rejected("wrong_round", f"key of round {item.round}, now {current_round}")
        if item.round < current_round - ROUNDS_KEPT + 1:
            raise Rejected("replayed", f"round {item.round} has closed")
        shared = decode_group(item.raw, self.caps)
        if shared.round != item.round:
            # A signed record copied from another round's key: the signature binds the key,
            # the payload names the round it was made for.
            raise Rejected("replayed" if shared.round < item.round else "wrong_round",
                           f"record of round {shared.round} under round {item.round}")
        if item.index >= self.caps.max_groups_per_peer or \
                self._per_round[(item.sender, item.round)] >= self.caps.max_groups_per_peer:
            raise Rejected("too_many_groups", f"over {self.caps.max_groups_per_peer} in round {item.round}")
        if sum(c.sender == item.sender for c in self.pool) >= self.caps.max_groups_per_peer:
            raise Rejected("flooding", "the sender already fills its share of the pool")
        digest = group_digest(shared.spec, shared.completions)
        if digest in self._digests:
            first_sender, _ = self._digests[digest]
            if first_sender == item.sender:
                raise Rejected("duplicate")
            # Who wrote it first cannot be known (a copier may be faster): neither copy is
            # trained on, so copying earns nothing. Our own groups are never in the pool.
            contested = [c for c in self.pool if c.digest == digest]
            self.pool = [c for c in self.pool if c.digest != digest]
            self.rejected["copied"] += len(contested)
            raise Rejected("copied")
        try:
            record = record_from_spec(self.task, dict(shared.spec))
        except SpecError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        self._digests[digest] = (item.sender, item.round)
        self._per_round[(item.sender, item.round)] += 1
        return Candidate(item.sender, item.round, shared, record, digest)

    def _forget_before(self, oldest_round: int) -> None:
        """Drop pooled records and bookkeeping of closed rounds (the round check covers them)."""
        self.pool = [c for c in self.pool if c.round >= oldest_round]
        self._handled = {k: r for k, r in self._handled.items() if r >= oldest_round - 1}
        self._digests = {d: v for d, v in self._digests.items() if v[1] >= oldest_round - 1}
        self._per_round = Counter({k: n for k, n in self._per_round.items() if k[1] >= oldest_round - 1})

    # ---- training ------------------------------------------------------------------------------

    def take(self, count: int, judge: Judge, credit: SenderCredit, max_share: float,
             rng: random.Random, max_judged: int | None = None) -> list[tuple[Candidate, Group]]:
        """Up to `count` judged groups, drawn one by one in proportion to sender credit, at most
        `per_sender_cap(count, max_share)` from one sender.

        Every drawn candidate leaves the pool whether it passes or not, and at most `max_judged`
        (default 4 x count) are judged per call: the work peers can cause us is bounded.
        """
        max_judged = 4 * count if max_judged is None else max_judged
        cap = per_sender_cap(count, max_share)
        accepted: list[tuple[Candidate, Group]] = []
        per_sender: Counter[str] = Counter()
        judged = 0
        while len(accepted) < count and judged < max_judged:
            eligible = [c for c in self.pool if per_sender[c.sender] < cap]
            if not eligible:
                break
            candidate = rng.choices(eligible, weights=[credit.credit(c.sender) for c in eligible])[0]
            self.pool.remove(candidate)
            judged += 1
            group = self._judge(candidate, judge, credit)
            if group is not None:
                per_sender[candidate.sender] += 1
                accepted.append((candidate, group))
        return accepted

    def _judge(self, candidate: Candidate, judge: Judge, credit: SenderCredit) -> Group | None:
        group = judge.build_group(candidate.record, list(candidate.shared.completions), candidate.sender)
        rewards = group.rewards
        if max(rewards) == min(rewards):
            self.rejected["uninformative"] += 1
            credit.record(candidate.sender, useful=False)
            return None
        if self.is_unlikely(judge.mean_logprobs(group)):
            self.rejected["unlikely"] += 1
            credit.record(candidate.sender, useful=False)
            return None
        credit.record(candidate.sender, useful=max(rewards) > 0)
        return group

    def is_unlikely(self, values: list[float]) -> bool:
        """True when any completion's mean log-likelihood lies far below our own samples'.

        A robust z-score against our own recent samples (median and MAD, floored at 0.05
        nats/token): each node compares text with what it itself would write, so nodes with
        different models and tokenizers each apply their own scale.
        """
        if len(self.reference) < self.min_reference:
            return False  # no picture of our own samples yet
        median = statistics.median(self.reference)
        mad = statistics.median(abs(v - median) for v in self.reference)
        scale = max(1.4826 * mad, 0.05)
        return any((v - median) / scale < -self.likelihood_z for v in values)

    # ---- checkpoint ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What must survive a restart: what was already handled (so nothing is trained twice)."""
        return {"rejected": dict(self.rejected), "received": self.received,
                "handled": [[*k, r] for k, r in self._handled.items()],
                "digests": {d: list(v) for d, v in self._digests.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rejected = Counter(state["rejected"])
        self.received = state.get("received", 0)
        self._handled = {(s, rnd, i): r for s, rnd, i, r in state["handled"]}
        self._digests = {d: (v[0], v[1]) for d, v in state["digests"].items()}
