"""A swarm node's step never waits on the network past its bound, and its status is a heartbeat.

The transport is replaced by one whose DHT read stalls until the test releases it — what a read
does while RPCs to a peer that just died time out. The inbox, the task, the verifier and the
node's own logic are the real ones.
"""

from __future__ import annotations

import asyncio
import threading
import time

import rollover.swarm.payload_cache  # noqa: F401 - loaded by a real transport's start (hivemind: ~1.5 s)
from rollover.rollout.types import Group, Sample
from rollover.swarm.node import SwarmNode
from rollover.swarm.inbox import Incoming
from rollover.swarm.records import encode_group
from rollover.tasks import arithmetic
from rollover.swarm.config import SwarmConfig

from swarm_fakes import TASK, CharJudge  # noqa: E402 - tests/unit is on sys.path
ROUND_SECONDS = 4.0
NOW = 1000 * ROUND_SECONDS + 1.0  # inside round 1000


class StalledTransport:
    """A transport whose reads block until `release` is set; every call is recorded."""

    sender = "me"

    def __init__(self):
        self.release = threading.Event()
        self.reads = 0
        self.statuses: list[int] = []
        self.published: list[tuple[int, int, int]] = []  # (round, first index, payloads)

    def collect(self, round_index: int, new_only: bool = False, budget=None, prefer=(), max_index=256) -> list:
        self.reads += 1
        self.release.wait(timeout=30)
        return []

    def publish(self, round_index: int, payloads: list[bytes], expires: float, first_index: int = 0) -> int:
        self.published.append((round_index, first_index, len(payloads)))
        return len(payloads)

    def publish_status(self, round_index: int, status: dict, expires: float) -> bool:
        self.statuses.append(round_index)
        return True

    def shutdown(self) -> None:
        self.release.set()


def answers(index: int) -> list[str]:
    numbers = arithmetic.make_problem(0, index, 1, 3, 2, None)
    return [arithmetic.solution_text(numbers), f"#{sum(numbers) + 1}"]  # one right, one wrong: informative


def local_group(index: int) -> Group:
    samples = [Sample(prompt_ids=[1], response_ids=[5, 6], logprobs=[-1.0, -1.0], finish_reason="stop",
                      text=text, reward=1.0) for text in answers(index)]
    return Group(uid=index, task=TASK.record(index), samples=samples)


def make_node(tmp_path, clock=lambda: NOW) -> tuple[SwarmNode, StalledTransport]:
    cfg = SwarmConfig(enabled=True, round_seconds=ROUND_SECONDS, external_groups=2)
    node = SwarmNode(cfg, TASK, group_size=2, run_folder=tmp_path, seed=0, clock=clock)
    node.transport, node.sender = StalledTransport(), "me"
    return node, node.transport


def test_a_stalled_dht_read_does_not_hold_the_step(tmp_path):
    node, transport = make_node(tmp_path)
    current = int(NOW // ROUND_SECONDS)
    # What the background collector had already read: two informative groups from peers.
    node.inbox.admit([Incoming(peer, current, 0, encode_group(current, TASK.record(10 + i)["spec"],
                                                               answers(10 + i)))
                      for i, peer in enumerate(("peer-a", "peer-b"))], current)

    async def two_steps():
        try:
            timings = []
            for step in range(2):
                started = time.perf_counter()
                external, metrics = await asyncio.wait_for(
                    node.exchange(step, [local_group(step)], CharJudge()), timeout=10)
                timings.append(time.perf_counter() - started)
                if step == 0:
                    first = (external, metrics)
            return timings, first, metrics
        finally:
            transport.release.set()
            await node.close()

    timings, (external, metrics), second = asyncio.run(two_steps())
    # The step waited for the read no longer than its bound, and trained on what the pool held.
    assert all(t < node.collect_wait + 1.0 for t in timings), timings
    assert {g.sender for g in external} == {"peer-a", "peer-b"}
    assert metrics["swarm/slow_reads"] == 1 and second["swarm/slow_reads"] == 2
    assert transport.reads <= 2  # one stalled read is reused, not stacked (two rounds per read)


def test_status_is_published_once_per_round_even_without_steps(tmp_path):
    now = [NOW]
    node, transport = make_node(tmp_path, clock=lambda: now[0])

    async def rounds():
        await node._heartbeat()
        await node._heartbeat()  # the same round: nothing new
        now[0] += ROUND_SECONDS
        await node._heartbeat()

    asyncio.run(rounds())
    first = int(NOW // ROUND_SECONDS)
    assert transport.statuses == [first, first + 1]


def test_steps_in_one_round_publish_under_the_next_indices(tmp_path):
    """Re-storing an index in a round is refused by the DHT: a second step's groups must not be lost."""
    now = [NOW]
    node, transport = make_node(tmp_path, clock=lambda: now[0])
    transport.release.set()  # reads answer at once here

    async def steps():
        try:
            for step, advance in enumerate((0.0, 0.5, ROUND_SECONDS)):
                now[0] += advance
                await node.exchange(step, [local_group(2 * step), local_group(2 * step + 1)], CharJudge())
            await node._publishing
        finally:
            await node.close()

    asyncio.run(steps())
    first = int(NOW // ROUND_SECONDS)
    assert transport.published == [(first, 0, 2), (first, 2, 2), (first + 1, 0, 2)]


class SlowJudge(CharJudge):
    """A judge whose likelihood pass takes `seconds` of a thread's time, as policy forward passes do."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def mean_logprobs(self, group):
        time.sleep(self.seconds)
        return super().mean_logprobs(group)


def test_judging_peers_does_not_stop_the_event_loop(tmp_path):
    """The rollout running ahead streams on the same event loop as `exchange`: while peers' groups
    are judged (was: inline, ~0.3 s per group with no tick of the loop), the loop keeps running."""
    node, transport = make_node(tmp_path)
    transport.release.set()
    current = int(NOW // ROUND_SECONDS)
    node.inbox.admit([Incoming(peer, current, 0, encode_group(current, TASK.record(20 + i)["spec"], answers(20 + i)))
                      for i, peer in enumerate(("peer-a", "peer-b"))], current)
    judge = SlowJudge(0.3)

    async def step_with_a_ticker():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            await asyncio.sleep(0.05)
            before = ticks
            external, _ = await node.exchange(0, [local_group(0)], judge)
            return external, ticks - before
        finally:
            ticker.cancel()
            await node.close()

    external, ticks = asyncio.run(step_with_a_ticker())
    assert {g.sender for g in external} == {"peer-a", "peer-b"}  # both judged (2 x 0.3 s)
    assert ticks >= 20, ticks  # ~60 ticks of 10 ms in 0.6 s of judging; 0 when the judge blocks the loop


def test_a_node_that_takes_no_external_groups_waits_for_no_read(tmp_path):
    """swarm.external_groups=0 (issue 25: 1.9 s a step in the 8/0 runs): the step publishes and
    reads nothing; the stalled transport would hold it collect_wait seconds otherwise."""
    cfg = SwarmConfig(enabled=True, round_seconds=ROUND_SECONDS, external_groups=0)
    node = SwarmNode(cfg, TASK, group_size=2, run_folder=tmp_path, seed=0, clock=lambda: NOW)
    node.transport, node.sender = StalledTransport(), "me"

    async def step():
        try:
            started = time.perf_counter()
            external, metrics = await node.exchange(0, [local_group(0)], CharJudge())
            waited = time.perf_counter() - started
            await node._publishing
            return external, metrics, waited
        finally:
            node.transport.release.set()
            await node.close()

    external, metrics, waited = asyncio.run(step())
    assert external == [] and node.transport.reads == 0 and metrics["swarm/slow_reads"] == 0
    assert waited < node.collect_wait / 2, waited
    assert node.transport.published == [(int(NOW // ROUND_SECONDS), 0, 1)]  # still shares its groups


def test_a_node_restarted_within_a_round_publishes_under_the_next_indices(tmp_path):
    """The DHT refuses a re-stored index in a round: a node resumed from its checkpoint in the
    same round must continue its indices, not republish from 0 (issue 25)."""
    node, transport = make_node(tmp_path)
    transport.release.set()

    async def publish(n: SwarmNode, start: int):
        n._start_publish(int(NOW // ROUND_SECONDS), [local_group(start), local_group(start + 1)])
        await n._publishing

    asyncio.run(publish(node, 0))
    restarted, again = make_node(tmp_path)
    restarted.load_state_dict(node.state_dict())
    asyncio.run(publish(restarted, 2))
    first = int(NOW // ROUND_SECONDS)
    assert transport.published == [(first, 0, 2)] and again.published == [(first, 2, 2)]


def test_each_node_draws_its_own_problems_and_keeps_them_after_a_restart(tmp_path):
    """Peers with one recipe drew the same problems in the same order: a peer's group then held
    no new problem, and its identical answers were refused as copies (19% of the groups a
    4-node swarm received). Each node now starts at a point of the stream set by its identity."""
    from rollover.tasks.registry import record_from_spec

    def node(folder: str, **settings) -> SwarmNode:
        return SwarmNode(SwarmConfig(enabled=True, **settings), TASK, group_size=2, run_folder=tmp_path / folder, seed=0)

    first, other, restarted = node("a"), node("b"), node("a")
    assert first.problem_offset == restarted.problem_offset != other.problem_offset
    assert first.problem_offset == int(first.identity.sender_id, 16) % 2**61  # what peers can check
    assert node("c", problem_offset=7).problem_offset == 7
    # A peer regenerates a problem from this node's part of the stream, and its answer is the task's.
    record = TASK.record(first.problem_offset + 5)
    assert record_from_spec(TASK, record["spec"]) == record
    assert record["answer"] == str(sum(arithmetic.make_problem(0, first.problem_offset + 5, 1, 3, 2)))
