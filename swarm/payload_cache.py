"""Each DHT entry a node reads is parsed once: a flood of keys costs a dict look-up per poll.

A node reads the current and the previous round's shard dictionaries every few seconds, and
every entry comes back every time. Parsing one (owner marker, index, sender id from the key's
numbers) costs tens of microseconds; under 1,000 sybil keys with 16 entries each, that was about
0.4 s of CPU per poll. A subkey's verdict (who sent it, or why it is skipped) is the same in
every round, so it is worked out once; an entry of a round is identified by (shard, subkey,
expiration): hivemind replaces a subkey only with a later expiration, so the same three mean
the same signed entry. Values are never kept: the cache is a few hundred bytes per entry, and
bounded (MAX_VERDICTS subkeys; ROUNDS_CACHED rounds of MAX_ENTRIES_PER_ROUND entries).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rollover.swarm.entries import Received, parse_payload, shard_of, split_payload_subkey

ROUNDS_CACHED = 3  # a node reads two rounds per poll; one more for a poll across a round's end
MAX_ENTRIES_PER_ROUND = 65_536  # entries remembered as handed out, per round (past it: handed again)
MAX_VERDICTS = 65_536  # subkeys whose verdict is remembered (then all are forgotten)
MAX_PARSES_PER_READ = 512  # subkeys never seen before parsed per read (~20 us each)
NEW_ENTRIES_PER_READ = 2048  # new entries a node hands its inbox per round read (SwarmNode)

Verdict = tuple[str, bytes, int, int] | str  # (sender, owner marker, index, its shard), or why skipped


class PayloadCache:
    """Parses each subkey once (its verdict holds in every round: a sender's slot i has one subkey)
    and remembers, per round and shard, which entries were handed out (subkey -> expiration)."""

    def __init__(self, shards: int, max_record_bytes: int, max_entries_per_round: int = MAX_ENTRIES_PER_ROUND):
        self.shards, self.max_record_bytes = shards, max_record_bytes
        self.max_entries_per_shard = max(1, max_entries_per_round // shards)
        self._verdicts: dict[bytes, Verdict] = {}
        self._seen: dict[int, list[dict[bytes, float]]] = {}  # round -> per shard: subkey -> expiration

    def read(self, round: int, found: list[object], count: Callable[[str], None], new_only: bool = False,
             budget: int | None = None, prefer: Callable[[str], bool] | None = None) -> list[Received]:
        """The well-formed entries of a round, from each shard's get() result (`found[shard]`).

        `count(reason)` is called once per skipped entry (and expiration), when first seen. With
        `new_only`, entries handed out before are left out. The work is bounded: at most
        MAX_PARSES_PER_READ subkeys never seen before are parsed, and at most `budget` new
        entries are handed out, those of senders `prefer` names first; the others wait for a
        later read, neither lost nor counted."""
        fresh: list[tuple[dict[bytes, float], bytes, Received]] = []
        parses = MAX_PARSES_PER_READ
        seen_round = self._seen_in(round)
        verdicts = self._verdicts
        for shard, result in enumerate(found[: self.shards]):
            table = getattr(result, "value", None)
            if not isinstance(table, dict):
                continue
            seen = seen_round[shard]
            for subkey, entry in table.items():
                try:
                    raw, expiration = entry.value, entry.expiration_time
                    again = seen.get(subkey) == expiration
                    if again and new_only:
                        continue  # handed out (or counted) on an earlier read
                    verdict = verdicts.get(subkey)
                except Exception:  # an odd entry or an unhashable subkey: nothing to remember it by
                    count("malformed")
                    continue
                if verdict is None:
                    if parses <= 0:
                        continue  # parsed on a later read: a flood of new keys costs a bounded slice
                    parses -= 1
                    verdict = self._parse(subkey)
                    if len(verdicts) >= MAX_VERDICTS:
                        verdicts.clear()
                    verdicts[subkey] = verdict
                reason = self._skip(verdict, shard, raw)
                if reason is not None:
                    if not again:
                        self._remember(seen, subkey, expiration)
                        count(reason)
                    continue
                item = Received(verdict[0], verdict[1], verdict[2], raw, round,
                                expiration if expiration.__class__ is float else math.inf)
                fresh.append((seen, subkey, item) if not again else (None, subkey, item))
        if budget is not None and sum(seen is not None for seen, _, _ in fresh) > budget:
            if prefer is not None:  # stable: table order within each class
                fresh.sort(key=lambda entry: not prefer(entry[2].sender))
            kept, left = [], budget
            for entry in fresh:
                if entry[0] is None or left > 0:
                    kept.append(entry)
                    left -= entry[0] is not None
            fresh = kept
        for seen, subkey, item in fresh:
            if seen is not None:
                self._remember(seen, subkey, item.expiration)
        return [item for _, _, item in fresh]

    def _skip(self, verdict: Verdict, shard: int, raw: object) -> str | None:
        """Why an entry is skipped, or None."""
        if verdict.__class__ is str:
            return verdict
        if verdict[3] != shard or raw.__class__ is not bytes:
            return "malformed"
        return "oversized" if len(raw) > self.max_record_bytes else None

    def _remember(self, seen: dict[bytes, float], subkey: bytes, expiration: float) -> None:
        if len(seen) < self.max_entries_per_shard:
            seen[subkey] = expiration

    def _parse(self, subkey: bytes) -> Verdict:
        """parse_payload's verdict on a subkey (the value is checked per read), with the shard
        its owner writes it to."""
        split = split_payload_subkey(subkey) if subkey.__class__ is bytes else None
        home = shard_of(split[0], split[1], self.shards) if split is not None else 0
        try:
            item = parse_payload(subkey, b"", round=0, shard=home, shards=self.shards,
                                 max_record_bytes=self.max_record_bytes)
        except Exception:  # nothing a peer stores may raise here (e.g. a key that does not parse)
            return "malformed"
        return item if isinstance(item, str) else (item.sender, item.sender_key, item.index, home)

    def _seen_in(self, round: int) -> list[dict[bytes, float]]:
        seen = self._seen.get(round)
        if seen is None:
            seen = self._seen[round] = [{} for _ in range(self.shards)]
            while len(self._seen) > ROUNDS_CACHED:  # forget the oldest round
                del self._seen[min(self._seen)]
        return seen
