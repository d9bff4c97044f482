"""A node's inbox of peers' records: cheap checks on arrival, costly ones only for what it trains.

Arrival (`admit`): per-round and per-pool counts, a budget of new senders and one of records from
not-yet-established senders per round, and the pool's global cap (all before a byte is parsed),
then schema and caps, signed round against the key's round, regeneration of the task from its
spec with this node's registry, and the copy check on each completion (swarm/copies.py). What
passes waits in the pool (swarm/candidates.py) for at most two rounds. Nothing a record holds
can stop admission: any error is that record's, counted `malformed`, and the poll goes on.

Training (`take`): groups are drawn from the pool by sender credit, each rebuilt and judged by
this node alone (`Judge`: re-tokenise, re-score, likelihood under its own policy), until J
pass. A peer can spend our compute only up to the caps; it cannot choose what we score against.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from rollover.rollout.types import Group
from rollover.swarm.candidates import POOL_CAP, Candidate, CandidatePool, Rank
from rollover.swarm.copies import CopyMemory
from rollover.swarm.likelihood import MIN_REFERENCE, LIKELIHOOD_FLOOR, LikelihoodFilter
from rollover.swarm.records import Caps, Rejected, completion_digest, decode_group, group_digest
from rollover.swarm.credit import SenderCredit, draw_weights, newcomer_slots, per_sender_cap
from rollover.tasks.registry import SpecError, Task, record_from_spec

__all__ = ["Candidate", "Inbox", "Incoming", "Judge", "ROUNDS_KEPT"]

log = logging.getLogger(__name__)
ROUNDS_KEPT = 2  # a record is usable in its own round and the next: publishers finish late
NEW_SENDERS_PER_ROUND = 8  # senders never judged here admitted per round (keys are free)
NEWCOMER_RECORDS_PER_ROUND = 64  # records of not-yet-established senders decoded per round
COPY_SHARE = 0.5  # a group whose completions were at least this share seen elsewhere is a copy


class Incoming(NamedTuple):
    """One value as the transport read it: who signed it, under which round's key, which slot,
    and when its signed entry expires in the DHT (DHT time). A tuple: a flood makes thousands
    per poll."""

    sender: str
    round: int
    index: int
    raw: Any
    expiration: float = math.inf


class Judge(Protocol):
    """What the trainer side provides: the node's tokenizer, verifier and policy."""

    def build_group(self, record: dict[str, Any], completions: list[str], sender: str) -> Group:
        """Re-tokenised (capped at max_tokens) and re-scored with this node's own reward."""

    def mean_logprobs(self, group: Group) -> list[float]:
        """Per-token mean log-likelihood of each sample under this node's current policy."""


class Inbox:
    """Admits, pools and judges peers' records; counts every rejection by reason."""

    def __init__(self, task: Task, caps: Caps, likelihood_z: float, min_reference: int = MIN_REFERENCE,
                 pool_cap: int = POOL_CAP, new_senders_per_round: int = NEW_SENDERS_PER_ROUND,
                 salt: bytes | None = None, newcomer_records_per_round: int = NEWCOMER_RECORDS_PER_ROUND,
                 likelihood_z_each: float | None = None, likelihood_floor: float = LIKELIHOOD_FLOOR):
        self.task, self.caps = task, caps
        self.likelihood = LikelihoodFilter(likelihood_z, likelihood_z_each, likelihood_floor, min_reference)
        self.new_senders_per_round = new_senders_per_round
        # Newcomers fill few slots per step (sampler.newcomer_slots): decoding more of their
        # records per round than this is work a horde of keys makes us do for nothing.
        self.newcomer_records_per_round = newcomer_records_per_round
        self._newcomer_records: Counter[int] = Counter()  # round -> newcomers' records decoded
        self.rejected: Counter[str] = Counter()
        self.received = 0  # distinct records read from peers, over the run
        self._pool = CandidatePool(pool_cap)
        self._copies = CopyMemory()
        self._handled: dict[int, set[tuple[str, int]]] = {}  # round -> {(sender, index)} read
        self._per_round: Counter[tuple[str, int]] = Counter()  # admitted records per (sender, round)
        self._new_senders: dict[int, set[str]] = {}  # round -> never-judged senders admitted
        # Ties between senders are broken by a hash salted with this node's secret: no key can be
        # ground to win them (the round is public, so an unsalted hash of it could be).
        self._salt = os.urandom(16) if salt is None else salt  # tests pass one to be repeatable

    @property
    def pool(self) -> list[Candidate]:
        """The pooled candidates, oldest first (a copy: the pool itself is indexed)."""
        return list(self._pool)

    # ---- arrival -------------------------------------------------------------------------------

    def note_own(self, sender: str, round_index: int, spec: dict[str, Any], completions: list[str]) -> None:
        """Our own published group: a peer echoing its completions back is a copy."""
        self._copies.note((completion_digest(spec, c) for c in completions), sender, round_index)

    @property
    def reference(self) -> deque[float]:
        """Our own recent samples' mean log-probs, as the judge scores them."""
        return self.likelihood.reference

    def note_reference(self, values: Iterable[float]) -> None:
        """Own samples' mean log-probs already scored by the judge."""
        self.likelihood.note(values)

    def note_own_groups(self, groups: list[Group]) -> None:
        """This step's own groups: some of their samples are scored by the judge at the next
        `take` and join the likelihood reference (swarm/likelihood.py)."""
        self.likelihood.note_own_groups(groups)

    def admit(self, incoming: Iterable[Incoming], current_round: int, credit: SenderCredit | None = None) -> int:
        """Check newly read records; returns how many joined the pool. `credit` (the node's)
        ranks senders for the pool cap and tells newcomers apart; None: every sender is new."""
        credit = SenderCredit() if credit is None else credit
        self._forget_before(current_round - ROUNDS_KEPT + 1)
        self._pool.forget_ranks()
        fresh: list[Incoming] = []
        oldest = current_round - ROUNDS_KEPT + 1
        for item in incoming:
            if not isinstance(item.round, int) or not oldest <= item.round <= current_round:
                fresh.append(item)  # refused by round below; nothing kept for a round we do not read
                continue
            try:
                key = (item.sender, item.index)
                handled = self._handled.setdefault(item.round, set())
                seen = key in handled
            except Exception:  # not hashable: nothing a peer controls should get this far
                self.rejected["malformed"] += 1
                continue
            if seen:
                continue  # read again on a later poll: judged once
            handled.add(key)
            self.received += 1
            fresh.append(item)
        newcomers = self._choose_newcomers(fresh, credit)
        fresh = self._refuse_newcomers_past_budget(fresh, credit, newcomers, oldest, current_round)
        admitted = 0
        for item in self._in_trust_order(fresh, credit):
            try:
                self._admit_one(item, current_round, credit, newcomers)
                admitted += 1
            except Rejected as exc:
                self.rejected[exc.reason] += 1
            except Exception as exc:  # one bad record must never stop the rest of the poll
                log.debug("swarm: record from %s raised %s", str(item.sender)[:16], type(exc).__name__)
                self.rejected["malformed"] += 1
        return admitted

    def _in_trust_order(self, items: list[Incoming], credit: SenderCredit) -> list[Incoming]:
        """The order records of one poll are admitted in: earliest round first, then earliest
        expiration, then established senders by credit, then a salted hash (`_tie`).

        The order decides who keeps a group when a copy and its original are both new in one poll
        (later polls: the one seen first). A copier can only copy what was already published, so
        the original's round is the same or earlier and, among honest publishers (expiration =
        end of round + 1), its expiration the same or earlier. A copier that forges an earlier
        round or expiration to win gains nothing: the kept group is contested, credited to no one
        (`_check_copies`). A true tie is a coin no key can load."""
        keys: dict[tuple[str, int], tuple] = {}

        def key(item: Incoming) -> tuple:
            if not isinstance(item.sender, str) or not isinstance(item.round, int):
                return (math.inf, math.inf, True, 0.0, b"")
            expiration = item.expiration if isinstance(item.expiration, (int, float)) and \
                item.expiration == item.expiration else math.inf  # NaN: last
            found = keys.get((item.sender, item.round))
            if found is None:
                found = keys[(item.sender, item.round)] = (
                    not credit.is_established(item.sender), -credit.credit(item.sender),
                    self._tie(item.round, item.sender))
            return (item.round, expiration, *found)

        return sorted(items, key=key)

    def _tie(self, round_index: int, sender: str) -> bytes:
        """A per-round order of senders no peer can predict (salted with this node's secret)."""
        return hashlib.sha256(self._salt + f"{round_index}:{sender}".encode()).digest()

    def _refuse_newcomers_past_budget(self, items: list[Incoming], credit: SenderCredit,
                                      newcomers: dict[int, set[str]], oldest: int, current_round: int) -> list[Incoming]:
        """Count as `new_senders` or `newcomer_records` every record that `_admit_one` would refuse
        for that reason alone, a sender at a time (a flood of keys is thousands of such records per
        poll); the rest."""
        by_sender: dict[tuple[str, int], list[Incoming]] = {}
        rest: list[Incoming] = []
        for item in items:
            if item.sender.__class__ is str and item.round.__class__ is int and oldest <= item.round <= current_round:
                by_sender.setdefault((item.sender, item.round), []).append(item)
            else:
                rest.append(item)
        most = self.caps.max_groups_per_peer
        for (sender, round_index), group in by_sender.items():
            if credit.is_established(sender):
                rest.extend(group)
                continue
            if credit.is_new(sender) and sender not in newcomers.get(round_index, ()):
                reason = "new_senders"
            elif self._newcomer_records[round_index] >= self.newcomer_records_per_round:
                reason = "newcomer_records"
            else:
                rest.extend(group)
                continue
            for item in group:  # the checks _admit_one makes before these budgets
                if item.index.__class__ is int and 0 <= item.index < most and \
                        self._per_round[(sender, round_index)] < most:
                    self.rejected[reason] += 1
                else:
                    rest.append(item)
        return rest

    def _choose_newcomers(self, items: list[Incoming], credit: SenderCredit) -> dict[int, set[str]]:
        """Per round, the never-judged senders that may still be admitted: the round's remaining
        budget, filled in an order no key can choose (`_tie`)."""
        wanting: dict[int, set[str]] = {}
        for item in items:
            if isinstance(item.sender, str) and isinstance(item.round, int) and credit.is_new(item.sender):
                wanting.setdefault(item.round, set()).add(item.sender)
        chosen = {}
        for round_index, senders in wanting.items():
            admitted = self._new_senders.get(round_index, set())
            room = max(0, self.new_senders_per_round - len(admitted))
            order = sorted(senders - admitted, key=lambda s: self._tie(round_index, s))
            chosen[round_index] = admitted | set(order[:room])
        return chosen

    def _rank(self, sender: str, round_index: int, credit: SenderCredit) -> Rank:
        return (credit.is_established(sender), credit.credit(sender), round_index)

    def _admit_one(self, item: Incoming, current_round: int, credit: SenderCredit,
                   newcomers: dict[int, set[str]]) -> None:
        # Cheap checks first: a flood is turned away before its bytes are parsed.
        if not isinstance(item.sender, str) or not isinstance(item.round, int) or not isinstance(item.index, int):
            raise Rejected("malformed", "incoming item of the wrong types")
        if item.round > current_round:
            raise Rejected("wrong_round", f"key of round {item.round}, now {current_round}")
        if item.round < current_round - ROUNDS_KEPT + 1:
            raise Rejected("replayed", f"round {item.round} has closed")
        if not 0 <= item.index < self.caps.max_groups_per_peer or \
                self._per_round[(item.sender, item.round)] >= self.caps.max_groups_per_peer:
            raise Rejected("too_many_groups", f"over {self.caps.max_groups_per_peer} in round {item.round}")
        # No separate per-sender pool cap: the pool keeps ROUNDS_KEPT rounds, so an honest peer at
        # its per-round cap holds up to ROUNDS_KEPT x max_groups_per_peer there, and a cap of one
        # round's worth refused its new round while the last one waited (issue 25: 19 of 128).
        is_new = credit.is_new(item.sender)
        if is_new and item.sender not in newcomers.get(item.round, ()):
            raise Rejected("new_senders", f"over {self.new_senders_per_round} new senders in round {item.round}")
        established = credit.is_established(item.sender)
        if not established and self._newcomer_records[item.round] >= self.newcomer_records_per_round:
            raise Rejected("newcomer_records", f"over {self.newcomer_records_per_round} in round {item.round}")
        rank = self._rank(item.sender, item.round, credit)
        if self._pool.full():
            lowest_rank, _ = self._pool.lowest(lambda c: self._rank(c.sender, c.round, credit))
            if rank <= lowest_rank:
                raise Rejected("pool_full", "the pool holds only senders of equal or higher credit")

        if not established:
            self._newcomer_records[item.round] += 1
        shared = decode_group(item.raw, self.caps)
        if shared.round != item.round:
            # A signed record copied from another round's key: the signature binds the key,
            # the payload names the round it was made for.
            raise Rejected("replayed" if shared.round < item.round else "wrong_round",
                           f"record of round {shared.round} under round {item.round}")
        try:
            record = record_from_spec(self.task, dict(shared.spec))
        except SpecError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        # Digests over OUR regeneration of the spec and the normalised text (records.py).
        digests = tuple(completion_digest(record["spec"], c) for c in shared.completions)
        self._check_copies(item.sender, digests)

        candidate = Candidate(item.sender, item.round, shared, record,
                              group_digest(record["spec"], list(shared.completions)), digests)
        if self._pool.full():
            _, evicted = self._pool.lowest(lambda c: self._rank(c.sender, c.round, credit))
            self._pool.remove(evicted)
            self.rejected["pool_full"] += 1
        self._pool.add(candidate)
        self._copies.note(digests, item.sender, item.round)
        self._per_round[(item.sender, item.round)] += 1
        if is_new:
            self._new_senders.setdefault(item.round, set()).add(item.sender)

    def _check_copies(self, sender: str, digests: tuple[str, ...]) -> None:
        """Refuse a group most of whose completions were seen before; the first sender's group
        stays (a copier must not be able to censor it) but earns no one credit."""
        distinct = set(digests)
        others, own = self._copies.split(distinct, sender)
        if (len(others) + len(own)) < COPY_SHARE * len(distinct):
            return  # mostly new text: two honest peers may well write the same right answer
        for digest in others:
            holder = self._pool.holding(digest)
            if holder is not None:
                holder.contested = True
        if others:
            raise Rejected("copied", f"{len(others)} of {len(distinct)} completions seen from others")
        raise Rejected("duplicate", f"{len(own)} of {len(distinct)} completions sent before")

    def _forget_before(self, oldest_round: int) -> None:
        """Drop pooled records and bookkeeping of closed rounds (the round check covers them)."""
        self._pool.forget_before(oldest_round)
        for table in (self._handled, self._new_senders, self._newcomer_records):
            for round_index in [r for r in table if r < oldest_round - 1]:
                del table[round_index]
        if any(k[1] < oldest_round - 1 for k in self._per_round):
            self._per_round = Counter({k: n for k, n in self._per_round.items() if k[1] >= oldest_round - 1})
        self._copies.forget_before(oldest_round)

    # ---- training ------------------------------------------------------------------------------

    def take(self, count: int, judge: Judge, credit: SenderCredit, max_share: float,
             rng: random.Random, max_judged: int | None = None) -> list[tuple[Candidate, Group]]:
        """Up to `count` judged groups, drawn one by one by sender credit (`draw_weights`: a
        sender's groups weigh its credit together, newcomers share one prior), at most
        `per_sender_cap(count, max_share)` from one sender, and newcomers together at most
        `newcomer_slots(count)` (judged: twice that) while established senders' groups wait.

        Every drawn candidate leaves the pool whether it passes or not, and at most `max_judged`
        (default 4 x count) are judged per call: the work peers can cause us is bounded.
        """
        max_judged = 4 * count if max_judged is None else max_judged
        if count > 0:
            self.likelihood.score_pending(judge)
        cap = per_sender_cap(count, max_share)
        newcomer_cap = newcomer_slots(count)
        accepted: list[tuple[Candidate, Group]] = []
        per_sender: Counter[str] = Counter()
        judged = newcomers_judged = newcomers_taken = 0
        while len(accepted) < count and judged < max_judged:
            eligible = [c for c in self._pool if per_sender[c.sender] < cap]
            established = [c for c in eligible if credit.is_established(c.sender)]
            if established and (newcomers_taken >= newcomer_cap or newcomers_judged >= 2 * newcomer_cap):
                eligible = established  # newcomers had their share of this step
            if not eligible:
                break
            weights = draw_weights([c.sender for c in eligible], credit)
            candidate = rng.choices(eligible, weights=weights)[0]
            newcomer = not credit.is_established(candidate.sender)
            self._pool.remove(candidate)
            judged += 1
            newcomers_judged += newcomer
            try:
                group = self._judge(candidate, judge, credit)
            except Exception as exc:  # e.g. text our tokenizer refuses: that group's problem only
                log.debug("swarm: judging a group from %s raised %s", candidate.sender, type(exc).__name__)
                self.rejected["malformed"] += 1
                self._credit(credit, candidate, useful=False)
                group = None
            if group is not None:
                per_sender[candidate.sender] += 1
                newcomers_taken += newcomer
                accepted.append((candidate, group))
        self._pool.forget_ranks()  # credit moved
        return accepted

    def _judge(self, candidate: Candidate, judge: Judge, credit: SenderCredit) -> Group | None:
        completions = list(candidate.shared.completions)
        group = judge.build_group(candidate.record, completions, candidate.sender)
        wrong_steps = self._check_steps(group, completions, candidate.record)
        rewards = group.rewards
        if max(rewards) == min(rewards):
            self.rejected["uninformative"] += 1
            self._credit(credit, candidate, useful=False)
            return None
        if self.likelihood.is_unlikely(judge.mean_logprobs(group), rewards):
            self.rejected["unlikely"] += 1
            self._credit(credit, candidate, useful=False)
            return None
        # A group whose right answers rest on wrong working disagrees with our verifier: it is
        # trained with those completions scored wrong, and costs its sender credit.
        self._credit(credit, candidate, useful=max(rewards) > 0 and not wrong_steps)
        return group

    def _check_steps(self, group: Group, completions: list[str], record: dict[str, Any]) -> int:
        """Score as wrong each completion whose answer our verifier accepted but whose worked
        steps the task finds wrong (tasks with `check_steps`); returns how many."""
        check = getattr(self.task, "check_steps", None)
        if check is None:
            return 0  # this task checks final answers only (see the README's swarm section)
        wrong = 0
        for sample, sent in zip(group.samples, completions):
            if sample.reward is not None and sample.reward > 0 and not check(sample.text or sent, record):
                sample.reward = min(sample.reward, 0.0)
                wrong += 1
        if wrong:
            self.rejected["wrong_steps"] += wrong
        return wrong

    @staticmethod
    def _credit(credit: SenderCredit, candidate: Candidate, useful: bool) -> None:
        """Record a verdict on the sender, unless a copy of the group arrived: then who wrote it
        cannot be known, and nobody earns or loses credit for it."""
        if not candidate.contested:
            credit.record(candidate.sender, useful=useful, round_index=candidate.round)

    def is_unlikely(self, values: list[float], rewards: list[float] | None = None) -> bool:
        """The likelihood filter's verdict on a group (swarm/likelihood.py)."""
        return self.likelihood.is_unlikely(values, rewards)

    # ---- checkpoint ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What must survive a restart: what was already handled (so nothing is trained twice),
        and the likelihood reference (a resumed node judges peers at once, not after two steps
        in which any text would pass)."""
        return {"rejected": dict(self.rejected), "received": self.received,
                "handled": [[s, r, i, r] for r, keys in self._handled.items() for s, i in keys],
                "copies": self._copies.state_dict(), "likelihood_reference": list(self.likelihood.reference)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rejected = Counter(state["rejected"])
        self.received = state.get("received", 0)
        self._handled = {}
        for sender, _, index, round_index in state["handled"]:
            self._handled.setdefault(round_index, set()).add((sender, index))
        if "copies" in state:  # checkpoints before per-completion digests kept group digests only
            self._copies.load_state_dict(state["copies"])
        self.likelihood.reference.clear()
        self.likelihood.note(float(v) for v in state.get("likelihood_reference", []))  # older: none kept
