"""Each DHT entry a node reads is parsed once: a flood of keys costs a dict look-up per poll.

A node reads the current and the previous round's shard dictionaries every few seconds, and
every entry comes back every time. Parsing one (owner marker, index, sender id from the key's
numbers) costs tens of microseconds; under 1,000 sybil keys with 16 entries each, that was about
0.4 s of CPU per poll. A subkey's verdict (who sent it, or why it is skipped) is the same in
every round, so it is worked out once. A round's entry is new when its subkey is: a later
expiration under the same subkey is its owner republishing the same slot, which the inbox
judges once per round anyway (inbox.py). Values are never kept: the cache is a few hundred bytes per entry, and
bounded (MAX_VERDICTS subkeys; ROUNDS_CACHED rounds of MAX_ENTRIES_PER_ROUND entries).

A polling node's cache lives in its DHT process (read_new_in_dht, run there by
DHT.run_coroutine): a shard key's whole dictionary (~32k entries, ~12 MB under a flood) stays
there, and only the entries not handed out before cross the pipe to the trainer's process, so the
trainer neither unpickles a flood nor has its garbage collector walk it on every poll.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from rollover.swarm.entries import Received, parse_payload, shard_of, split_payload_subkey
from rollover.swarm.guard import MAX_GROUPS_PER_ROUND

ROUNDS_CACHED = 3  # a node reads two rounds per poll; one more for a poll across a round's end
MAX_ENTRIES_PER_ROUND = 65_536  # entries remembered as handed out, per round (past it: handed again)
MAX_VERDICTS = 65_536  # subkeys whose verdict is remembered (then only known senders' are kept)
MAX_PARSES_PER_READ = 256  # subkeys never seen before parsed per read (~20 us each)
NEW_ENTRIES_PER_READ = 1024  # new entries a node hands its inbox per round read (SwarmNode)
MAX_READERS = 8  # readers (SwarmTransports) whose caches one DHT process keeps, least recent dropped

Verdict = tuple[str, bytes, int, int] | str  # (sender, owner marker, index, its shard), or why skipped


class PayloadCache:
    """Parses each subkey once (its verdict holds in every round: a sender's slot i has one subkey)
    and remembers, per round and shard, which subkeys were handed out or counted."""

    def __init__(self, shards: int, max_record_bytes: int, max_entries_per_round: int = MAX_ENTRIES_PER_ROUND):
        self.shards, self.max_record_bytes = shards, max_record_bytes
        self._markers: dict[str, bytes] = {}  # sender -> owner marker (trimmed with the verdicts)
        self._known: set[str] = set()  # the senders preferred by the last read
        self._parses = MAX_PARSES_PER_READ
        self.max_entries_per_shard = max(1, max_entries_per_round // shards)
        self._verdicts: dict[bytes, Verdict] = {}
        self._seen: dict[int, list[set[bytes]]] = {}  # round -> per shard: subkeys handed out

    def read(self, round: int, found: list[object], count: Callable[[str], None], new_only: bool = False,
             budget: int | None = None, prefer: Iterable[str] = (),
             max_index: int = MAX_GROUPS_PER_ROUND) -> list[Received]:
        """The well-formed entries of a round, from each shard's get() result (`found[shard]`).

        `count(reason)` is called once per skipped entry, when first seen. With `new_only`, only
        entries not handed out before, at most `budget` of them: first those of the senders in
        `prefer` (their slots below `max_index` looked up by subkey), then others in no
        order a peer can choose. The rest wait for a later read, neither lost nor counted; at most
        MAX_PARSES_PER_READ subkeys never seen before are parsed. A poll's work is bounded by the
        budget however many entries a flood stores (the set difference runs in C)."""
        limit = sys.maxsize if budget is None or not new_only else max(0, budget)
        tables: list[tuple[int, dict, set[bytes], Any]] = []  # (shard, table, seen, subkeys to look at)
        for shard, result in enumerate(found[: self.shards]):
            table = getattr(result, "value", None)
            if isinstance(table, dict):
                seen = self._seen_in(round)[shard]
                tables.append((shard, table, seen, table.keys() - seen if new_only else table.keys()))
        taken: list[tuple] = []  # (seen set or None, subkey, verdict, raw, expiration)
        self._known = set(prefer)
        self._parses = MAX_PARSES_PER_READ
        if new_only:  # known senders first: their slots' subkeys are looked up, not searched for
            for shard, table, seen, new in tables:
                for subkey in self._subkeys_of(prefer, shard, new, max_index):
                    if len(taken) >= limit:
                        break
                    self._take(round, shard, table, seen, subkey, False, count, taken)
        looked = 0  # past limit + parse budget looked at, the rest waits: the work stays bounded
        for shard, table, seen, new in tables:
            for subkey in new:
                if len(taken) >= limit or (new_only and looked >= limit + MAX_PARSES_PER_READ):
                    break
                looked += 1
                if subkey in seen:  # a preferred sender's entry, taken above
                    if new_only:
                        continue
                    self._take(round, shard, table, seen, subkey, True, count, taken)
                else:
                    self._take(round, shard, table, seen, subkey, False, count, taken)
        received = []
        for seen, subkey, verdict, raw, expiration in taken:
            received.append(Received(verdict[0], verdict[1], verdict[2], raw, round,
                                     expiration if expiration.__class__ is float else math.inf))
        return received

    def _take(self, round: int, shard: int, table: dict, seen: set[bytes], subkey: object, again: bool,
              count: Callable[[str], None], taken: list[tuple]) -> None:
        """Hand out one entry (into `taken`), or count why it is skipped (once)."""
        try:
            entry = table[subkey]
            raw, expiration = entry.value, entry.expiration_time
        except Exception:  # not a ValueWithExpiration: nothing a peer sends should be this
            count("malformed")
            return
        verdict = self._verdicts.get(subkey)
        if verdict is None:
            if self._parses <= 0:
                return  # parsed on a later read: a flood of new keys costs a bounded slice
            self._parses -= 1
            verdict = self._parse(subkey)
            if len(self._verdicts) >= MAX_VERDICTS:  # keys churned by a flood: keep the known ones'
                self._verdicts = {k: v for k, v in self._verdicts.items()
                                  if v.__class__ is not str and v[0] in self._known}
                if len(self._verdicts) >= MAX_VERDICTS // 2:  # known ones alone fill it: start over
                    self._verdicts = {}
                self._markers = {s: m for s, m in self._markers.items() if s in self._known}
            self._verdicts[subkey] = verdict
            if verdict.__class__ is not str:
                self._markers[verdict[0]] = verdict[1]
        reason = self._skip(verdict, shard, raw)
        if not again:
            self._remember(seen, subkey)
        if reason is not None:
            if not again:
                count(reason)
            return
        taken.append((None if again else seen, subkey, verdict, raw, expiration))

    def _subkeys_of(self, senders: Iterable[str], shard: int, new: set[bytes], max_index: int) -> list[bytes]:
        """The new subkeys in `shard` of the senders named (whose owner markers were parsed)."""
        found = []
        for sender in senders:
            marker = self._markers.get(sender)
            if marker is None:
                continue
            offset = shard_of(marker, 0, self.shards)
            for index in range((shard - offset) % self.shards, max_index, self.shards):
                subkey = marker + b"/%d" % index
                if subkey in new:
                    found.append(subkey)
        return found

    def _skip(self, verdict: Verdict, shard: int, raw: object) -> str | None:
        """Why an entry is skipped, or None."""
        if verdict.__class__ is str:
            return verdict
        if verdict[3] != shard or raw.__class__ is not bytes:
            return "malformed"
        return "oversized" if len(raw) > self.max_record_bytes else None

    def _remember(self, seen: set[bytes], subkey: bytes) -> None:
        if len(seen) < self.max_entries_per_shard:
            seen.add(subkey)

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

    def _seen_in(self, round: int) -> list[set[bytes]]:
        seen = self._seen.get(round)
        if seen is None:
            seen = self._seen[round] = [set() for _ in range(self.shards)]
            while len(self._seen) > ROUNDS_CACHED:  # forget the oldest round
                del self._seen[min(self._seen)]
        return seen


async def read_new_in_dht(dht: Any, node: Any, *, reader: str, keys: list[str], round: int, shards: int,
                          max_record_bytes: int, budget: int | None, prefer: list[str], max_index: int,
                          timeout: float) -> tuple[list[Received], dict[str, int], dict[str, int]]:
    """Inside the DHT process (DHT.run_coroutine with a functools.partial of this): get each
    shard key (latest) and return the entries `reader` was not handed before (PayloadCache.read
    with new_only), the reasons entries were skipped, and the gets that failed, by kind.

    The reader's cache is kept on the DHT object, in that process, for the next call. A get is
    given `timeout` seconds (less than the caller waits), so entries are marked as handed out
    only when the answer can still reach the caller."""
    readers: OrderedDict[str, PayloadCache] = dht.__dict__.setdefault("_swarm_payload_readers", OrderedDict())
    cache = readers.get(reader)
    if cache is None or (cache.shards, cache.max_record_bytes) != (shards, max_record_bytes):
        cache = readers[reader] = PayloadCache(shards, max_record_bytes)
    readers.move_to_end(reader)
    while len(readers) > MAX_READERS:
        readers.popitem(last=False)
    failures: Counter[str] = Counter()

    async def get(key: str) -> object:
        try:
            return await asyncio.wait_for(node.get(key, latest=True), timeout)
        except asyncio.TimeoutError:
            failures["get_timeout"] += 1
        except Exception:
            failures["get_error"] += 1
        return None

    found = await asyncio.gather(*(get(key) for key in keys))
    skipped: Counter[str] = Counter()
    count = lambda reason: skipped.update((reason,))  # noqa: E731
    received = cache.read(round, list(found), count, new_only=True, budget=budget, prefer=prefer,
                          max_index=max_index)
    return received, dict(skipped), dict(failures)
