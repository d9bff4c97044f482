"""One swarm peer inside `rl-train`: publish our groups, collect peers', hand the trainer J.

The trainer sees one call per step, `exchange(step, local_groups, judge)`, which returns the
external groups to train on beside the local ones. Everything else runs in the background and
never holds a step up: a collector reads the current and previous round's records every few
seconds, publishing happens in a task of its own, and a step takes whatever passed by then
(a node alone trains on its local groups only).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollover.rollout.types import Group
from rollover.swarm.inbox import Inbox, Incoming, Judge
from rollover.swarm.records import Caps, encode_group, round_at
from rollover.swarm.credit import SenderCredit
from rollover.tasks.registry import Task
from rollover.swarm.config import SwarmConfig

log = logging.getLogger(__name__)
AUDIT_LOG = "swarm_audit.jsonl"
TOP_SENDERS = 16  # senders named in metrics and the status: their size must not grow with the swarm


def problem_offset_for(sender_id: str) -> int:
    """A stream position from a sender id (16 hex digits of a hash): peers' offsets lie ~2^61 / N
    apart on average, so their problem streams (each a few thousand draws a day) never meet."""
    return int(sender_id, 16) % 2**61


class SwarmNode:
    def __init__(self, cfg: SwarmConfig, task: Task, group_size: int, run_folder: Path, seed: int,
                 clock: Callable[[], float] = time.time):
        self.cfg, self.run_folder, self.clock = cfg, run_folder, clock
        self.caps = Caps(max_record_bytes=cfg.max_record_bytes, max_groups_per_peer=cfg.max_groups_per_peer,
                         max_completion_chars=cfg.max_completion_chars,
                         max_completions=max(16, group_size))
        self.inbox = Inbox(task, self.caps, cfg.likelihood_z, likelihood_z_each=cfg.likelihood_z_each,
                           likelihood_floor=cfg.likelihood_floor)
        self.credit = SenderCredit()
        self.rng = random.Random(seed)
        self.transport = None  # a SwarmTransport once started (hivemind is imported only then)
        self.sender = ""
        self._collector: asyncio.Task | None = None
        self._publishing: asyncio.Task | None = None
        self._published: Counter[str] = Counter()  # "groups", "skipped_oversized", "store_failures"
        self._used: Counter[str] = Counter()  # external groups trained on, per sender
        self._read: asyncio.Future | None = None  # the step's fresh DHT read, while it runs
        self._round_indices: dict[int, int] = {}  # the round we last published in: its next index
        self._status_round = -1  # the latest round our status was published for
        self._slow_reads = 0  # steps that went on without waiting for a slow DHT read
        # The judge runs in a thread (its forward passes must not stop a rollout streaming on the
        # event loop); while it does, the collector's admissions and the status wait for it.
        self._inbox_lock = asyncio.Lock()
        # A step waits this long for a fresh read; the background collector polls as often.
        self.collect_wait = min(5.0, cfg.round_seconds / 4)

    # ---- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the DHT (the identity persists in `identity_path` or the run folder)."""
        from rollover.swarm.transport import SwarmTransport

        self.transport = SwarmTransport(
            self.cfg.name, self.identity, initial_peers=self.cfg.initial_peers, host_maddrs=self.cfg.host_maddrs,
            announce_maddrs=self.cfg.announce_maddrs or None, max_record_bytes=self.cfg.max_record_bytes,
            round_seconds=self.cfg.round_seconds)
        await asyncio.to_thread(self.transport.start)
        self.sender = self.transport.sender
        self._collector = asyncio.create_task(self._collect_forever())

    @functools.cached_property
    def identity(self):
        """This node's keys (swarm/identity.py), kept in `identity_path` or the run folder."""
        from rollover.swarm.identity import load_or_create_identity

        return load_or_create_identity(Path(self.cfg.identity_path or self.run_folder).expanduser())

    @property
    def problem_offset(self) -> int:
        """Where this node's training problems start in the task's stream (`swarm.problem_offset`;
        by default a function of its identity, so it is the same after a restart)."""
        if self.cfg.problem_offset is not None:
            return self.cfg.problem_offset
        return problem_offset_for(self.identity.sender_id)

    async def close(self) -> None:
        for task in (self._collector, self._publishing, self._read):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.transport is not None:
            await asyncio.to_thread(self.transport.shutdown)

    def maddrs(self) -> list[str]:
        return self.transport.visible_maddrs() if self.transport else []

    # ---- per step ------------------------------------------------------------------------------

    async def exchange(self, step: int, local_groups: list[Group], judge: Judge) -> tuple[list[Group], dict[str, float]]:
        """Publish this step's groups; return up to J judged external groups and the step's metrics
        (`time/swarm`: how long the step waited here, bounded whatever peers do)."""
        started = time.perf_counter()
        round_index = round_at(self.clock(), self.cfg.round_seconds)
        self.inbox.note_own_groups(local_groups)  # scored by the judge in `take`, as peers' text is
        self._start_publish(round_index, local_groups)
        taken, rejected_now = [], Counter()
        if self.cfg.external_groups > 0:  # a node that takes nothing waits for no read (issue 25)
            await self._collect_briefly()
            async with self._inbox_lock:
                rejected_before = Counter(self.inbox.rejected)
                taken = await asyncio.to_thread(self.inbox.take, self.cfg.external_groups, judge, self.credit,
                                                self.cfg.max_external_share_per_peer, self.rng)
                rejected_now = self.inbox.rejected - rejected_before
        self._audit(step, round_index, taken, rejected_now)
        groups = [group for _, group in taken]
        senders = {c.sender for c, _ in taken}
        for candidate, _ in taken:
            self._used[candidate.sender] += 1
        if len(self._used) > 4 * TOP_SENDERS:  # bounded: only the top senders are ever reported
            self._used = Counter(dict(self._used.most_common(2 * TOP_SENDERS)))
        local_rewards = [r for g in local_groups for r in g.rewards]
        metrics = {"swarm/round": float(round_index), "swarm/external_groups": float(len(groups)),
                   "swarm/external_share": len(groups) / max(1, len(groups) + len(local_groups)),
                   "swarm/local_reward": sum(local_rewards) / max(1, len(local_rewards)),
                   "swarm/received": float(self.inbox.received),
                   "swarm/external_senders": float(len(senders)), "swarm/pool": float(len(self.inbox.pool)),
                   **{f"swarm/credit/{s}": c for s, c in self.credit.top(TOP_SENDERS)},
                   **{f"swarm/used/{s}": float(n) for s, n in self._used.most_common(TOP_SENDERS)},
                   "swarm/senders_judged": float(len(self.credit.judged)),
                   "swarm/slow_reads": float(self._slow_reads),
                   "swarm/rejected": float(sum(self.inbox.rejected.values())),
                   **{f"swarm/rejected/{reason}": float(n) for reason, n in self.inbox.rejected.items()},
                   **{f"swarm/published/{k}": float(n) for k, n in self._published.items()}}
        if groups:
            rewards = [r for g in groups for r in g.rewards]
            metrics["swarm/external_reward"] = sum(rewards) / len(rewards)
            # How many rounds old the external groups were when trained on.
            metrics["swarm/round_lag"] = sum(round_index - c.round for c, _ in taken) / len(taken)
        metrics["time/swarm"] = time.perf_counter() - started
        return groups, metrics

    def _start_publish(self, round_index: int, groups: list[Group]) -> None:
        """Encode and store our groups in the background (the previous publish goes first)."""
        # Several steps may end in one round: their groups take the round's next indices, up to
        # the per-peer cap receivers apply (re-storing an index in a round would be refused).
        first_index = self._round_indices.get(round_index, 0)
        room = max(0, self.cfg.max_groups_per_peer - first_index)
        self._published["skipped_round_full"] += max(0, len(groups) - room)
        payloads = []
        for group in groups[:room]:
            completions = [s.text[: self.cfg.max_completion_chars] for s in group.samples]
            raw = encode_group(round_index, group.task["spec"], completions)
            if len(raw) > self.cfg.max_record_bytes:
                self._published["skipped_oversized"] += 1
                continue
            self.inbox.note_own(self.sender, round_index, group.task["spec"], completions)
            payloads.append(raw)
        self._round_indices = {round_index: first_index + len(payloads)}  # earlier rounds are over
        status = self._status(round_index)
        expires = (round_index + 2) * self.cfg.round_seconds
        previous = self._publishing

        async def publish() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            stored = await asyncio.to_thread(self.transport.publish, round_index, payloads, expires, first_index)
            self._published["groups"] += stored
            self._published["store_failures"] += len(payloads) - stored
            await asyncio.to_thread(self.transport.publish_status, round_index, status, expires)
            self._status_round = max(self._status_round, round_index)

        self._publishing = asyncio.create_task(publish())

    def _status(self, round_index: int) -> dict[str, Any]:
        """What `rl-swarm status` shows of us: rejections by reason and the credit we give peers."""
        return {"round": round_index, "rejected": dict(self.inbox.rejected),
                "credit": {s: round(c, 3) for s, c in self.credit.top(TOP_SENDERS)}}

    async def _collect_briefly(self) -> None:
        """One fresh read of the DHT, waited for at most `collect_wait` seconds.

        A read can stall on a peer that died (its RPCs time out); the step then goes on with the
        pool the background collector keeps, and the read finishes in the background.
        """
        if self._read is None or self._read.done():  # one read at a time: a stalled one is reused
            self._read = asyncio.ensure_future(self._collect_once())
        read = self._read
        try:
            await asyncio.wait_for(asyncio.shield(read), timeout=self.collect_wait)
        except asyncio.TimeoutError:
            self._slow_reads += 1
        except Exception as exc:  # a network hiccup must not end the run: the pool still serves
            log.warning("swarm: collecting failed: %s", exc)

    async def _collect_once(self) -> None:
        current = round_at(self.clock(), self.cfg.round_seconds)
        incoming: list[Incoming] = []
        for round_index in (current - 1, current):
            # Entries read on earlier polls were admitted or refused then (the inbox judges a
            # record once): only what is new costs this poll anything.
            # A flood is admitted in slices (payload_cache.py), senders we know first.
            # Imported here: payload_cache needs hivemind, which a run without a swarm never loads.
            from rollover.swarm.payload_cache import NEW_ENTRIES_PER_READ

            async with self._inbox_lock:
                known = list(self.credit.judged)  # bounded (credit.py): the senders we kept credit for
            for item in await asyncio.to_thread(self.transport.collect, round_index, True, NEW_ENTRIES_PER_READ,
                                                known, self.cfg.max_groups_per_peer):
                if item.sender != self.sender:
                    incoming.append(Incoming(item.sender, item.round, item.index, item.raw, item.expiration))
        async with self._inbox_lock:
            self.inbox.admit(incoming, current, self.credit)

    async def _collect_forever(self) -> None:
        """Keep the pool fresh between steps (a few seconds apart, never waiting on a peer)."""
        while True:
            await asyncio.sleep(self.collect_wait)
            try:
                await self._collect_once()
                await self._heartbeat()
            except Exception as exc:  # a network hiccup must not end the run: the next poll retries
                log.warning("swarm: collecting failed: %s", exc)

    async def _heartbeat(self) -> None:
        """Publish our status in every round, not only in rounds where a step ends: a node with
        slow steps stays visible to `rl-swarm status` (statuses live two rounds)."""
        current = round_at(self.clock(), self.cfg.round_seconds)
        if current > self._status_round and (self._publishing is None or self._publishing.done()):
            async with self._inbox_lock:
                status = self._status(current)
            await asyncio.to_thread(self.transport.publish_status, current, status,
                                    (current + 2) * self.cfg.round_seconds)
            self._status_round = current

    # ---- records kept ----------------------------------------------------------------------------

    def _audit(self, step: int, round_index: int, taken, rejected: Counter) -> None:
        """One line per step: the external groups trained on (sender, digest, spec, whether a copy of
        it came from another sender in the same poll: then who wrote it is unknown), rejections."""
        line = {"step": step + 1, "round": round_index,
                "external": [{"sender": c.sender, "digest": c.digest, "spec": c.record["spec"],
                              "round": c.round, "contested": c.contested} for c, _ in taken],
                "rejected": dict(rejected)}
        with (self.run_folder / AUDIT_LOG).open("a") as out:
            out.write(json.dumps(line) + "\n")

    def state_dict(self) -> dict[str, Any]:
        # The next index in the round we last published in: a node resumed within that round
        # continues it (the DHT refuses a re-stored index, issue 25).
        return {"credit": self.credit.state_dict(), "inbox": self.inbox.state_dict(),
                "rng": self.rng.getstate(), "round_indices": [[r, i] for r, i in self._round_indices.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.credit.load_state_dict(state["credit"])
        self.inbox.load_state_dict(state["inbox"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._round_indices = {int(r): int(i) for r, i in state.get("round_indices", [])}  # older: none kept

