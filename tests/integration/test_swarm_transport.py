"""The swarm transport on real hivemind DHT processes on loopback, with honest and hostile peers.

Three honest SwarmTransports (each with its own persisted identity) share one swarm with two raw
hivemind DHTs playing attackers: a forger with its own RSA validator and (from the first test that
asks for it) a vandal with no validators at all. Each test uses its own round so records do not
mix. Expected keys, shards and sender ids are computed here from hashlib and hivemind, not from
the code under test.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from rollover.swarm.entries import Received, parse_payload
from rollover.swarm.identity import SwarmError, load_or_create_identity
from rollover.swarm.guard import MAX_VALUE_BYTES
from rollover.swarm.transport import REJECTION_REASONS, SwarmTransport, harden_dht_pipe

pytestmark = pytest.mark.integration

NS = "swarmtest"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
SHARDS = 4
RECORD = 12288
# The DHT guard takes keys of rounds near now only: each test uses its own round R0 + k, and the
# transports here accept rounds up to 200 ahead (the attack suite tests the default, 1 ahead).
RS = 3600.0
AHEAD = 200
R0 = int(get_dht_time() // RS)
OPTIONS = dict(host_maddrs=LOOPBACK, shards=SHARDS, round_seconds=RS, rounds_ahead=AHEAD)


def rnd(k: int) -> int:
    return R0 + k


def expected_sender(private_key) -> str:
    """Sender ids name the key's numbers (identity.py), whatever text carries them."""
    numbers = private_key.get_public_key()._public_key.public_numbers()
    return hashlib.sha256(f"rsa:{numbers.n:x}:{numbers.e:x}".encode()).hexdigest()[:16]


def sender_of_marker(marker: bytes) -> str:
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    numbers = load_ssh_public_key(marker[len(b"[owner:"):-1]).public_numbers()
    return hashlib.sha256(f"rsa:{numbers.n:x}:{numbers.e:x}".encode()).hexdigest()[:16]


def expected_shard(marker: bytes, index: int) -> int:
    return (int.from_bytes(hashlib.sha256(marker).digest()[:8], "big") + index) % SHARDS


def shard_key(round: int, shard: int) -> str:
    return f"{NS}/r{round}/s{shard}"


async def local_subkeys(dht, node, key):
    """The subkeys a DHT process holds for `key` in its own storage (no network, no decoding)."""
    found = node.protocol.storage.get(DHTID.generate(source=key))
    return [subkey for subkey, _ in found.value.items()] if found is not None else []


def later(seconds: float = 300) -> float:
    return get_dht_time() + seconds


def payload(node: int, index: int, size: int = RECORD) -> bytes:
    """Distinct, reproducible payload bytes (hash stream)."""
    out, counter = b"", 0
    while len(out) < size:
        out += hashlib.sha256(f"{node}:{index}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("swarm")
    nodes = []
    try:
        first = SwarmTransport(NS, load_or_create_identity(folder / "n0"), max_record_bytes=RECORD,
                               **OPTIONS).start()
        nodes.append(first)
        peers = first.visible_maddrs()
        for i in (1, 2):
            nodes.append(SwarmTransport(NS, load_or_create_identity(folder / f"n{i}"), initial_peers=peers,
                                        max_record_bytes=RECORD, **OPTIONS).start())
        forger_key = RSAPrivateKey()
        forger = DHT(initial_peers=peers, start=True, host_maddrs=LOOPBACK,
                     record_validators=[RSASignatureValidator(forger_key)])
        harden_dht_pipe(forger)  # so the forger itself survives sending 100 KiB
        yield dict(nodes=nodes, folder=folder, forger=forger, forger_key=forger_key)
        forger.shutdown()
    finally:
        for node in nodes:
            node.shutdown()


@pytest.fixture(scope="module")
def vandal(swarm):
    """A DHT with no validators. It joins only when the first test needs it: while it is a replica,
    a refused store can still return True (a store returns the answer of the last replica)."""
    dht = DHT(initial_peers=swarm["nodes"][0].visible_maddrs(), start=True, host_maddrs=LOOPBACK)
    harden_dht_pipe(dht)  # so the vandal itself survives sending 100 KiB
    yield dht
    dht.shutdown()


def test_peer_ids_come_from_the_persisted_libp2p_keys(swarm):
    for i, node in enumerate(swarm["nodes"]):
        key_bytes = (swarm["folder"] / f"n{i}" / "swarm_p2p.key").read_bytes()
        assert node.peer_id == PeerID.from_identity(key_bytes).to_base58()
        assert any(maddr.startswith("/ip4/127.0.0.1/tcp/") and maddr.endswith(f"/p2p/{node.peer_id}")
                   for maddr in node.visible_maddrs())


def test_nodes_exchange_real_size_payloads(swarm):
    nodes, round, per_node = swarm["nodes"], rnd(1), 8
    expiration = later()
    for n, node in enumerate(nodes):
        assert node.publish(round, [payload(n, i) for i in range(per_node)], expiration) == per_node

    expected = {(expected_sender(node.identity.private_key), i, payload(n, i))
                for n, node in enumerate(nodes) for i in range(per_node)}
    for node in nodes:
        got = node.collect(round)
        assert all(isinstance(item, Received) and item.round == round for item in got)
        assert {(item.sender, item.index, item.raw) for item in got} == expected
        assert len(got) == len(expected)
        assert {item.sender_key for item in got} == {node.identity.public_key_marker for node in nodes}

    # the layout on the wire, read with hivemind's own API: each shard holds exactly the expected
    # subkeys, and one get returns a dictionary far over the 32 KiB that breaks a store
    for shard in range(SHARDS):
        found = swarm["forger"].get(shard_key(round, shard), latest=True)
        want = {node.identity.public_key_marker + f"/{i}".encode()
                for node in nodes for i in range(per_node)
                if expected_shard(node.identity.public_key_marker, i) == shard}
        assert set(found.value) == want
        assert sum(len(item.value) for item in found.value.values()) == len(want) * RECORD > 32 * 1024
    assert all(node.is_alive() for node in nodes)


def test_calls_from_many_threads_at_once(swarm):
    node, other, round = swarm["nodes"][0], swarm["nodes"][1], rnd(10)
    assert other.publish(round, [payload(1, i) for i in range(6)], later()) == 6

    def work(i: int):
        if i % 3 == 0:
            return node.publish(rnd(100 + i), [payload(0, 10 * i + j) for j in range(2)], later())
        if i % 3 == 1:
            return node.rejection_counts()
        return {(item.sender, item.raw) for item in node.collect(round)}

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(work, range(12)))

    others = {(other.identity.sender_id, payload(1, i)) for i in range(6)}
    assert [results[i] for i in range(0, 12, 3)] == [2, 2, 2, 2]
    assert all(set(results[i]) >= set(REJECTION_REASONS) for i in range(1, 12, 3))
    assert all(results[i] == others for i in range(2, 12, 3))
    for i in range(0, 12, 3):
        assert [item.raw for item in other.collect(rnd(100 + i))] == [payload(0, 10 * i), payload(0, 10 * i + 1)]
    assert node.is_alive()


def test_republishing_needs_a_later_expiration(swarm):
    node, reader, round = swarm["nodes"][2], swarm["nodes"][0], rnd(11)
    expiration = later()
    assert node.publish(round, [b"first"], expiration) == 1
    assert node.publish(round, [b"same expiration"], expiration) == 0  # refused by every replica
    assert [item.raw for item in reader.collect(round)] == [b"first"]
    assert node.publish(round, [b"second"], expiration + 1) == 1
    assert [item.raw for item in reader.collect(round)] == [b"second"]


def payloads_in(found: object, wanted: set[bytes]) -> int:
    """How many of `wanted` occur in an object that came down the DHT's pipe (any nesting)."""
    if isinstance(found, (bytes, bytearray)):
        return int(bytes(found) in wanted)
    if isinstance(found, dict):
        return sum(payloads_in(k, wanted) + payloads_in(v, wanted) for k, v in found.items())
    if isinstance(found, (list, tuple, set)):
        return sum(payloads_in(item, wanted) for item in found)
    return payloads_in(found.value, wanted) if hasattr(found, "value") else 0


def test_new_only_reads_bring_only_new_entries_out_of_the_dht_process(swarm, monkeypatch):
    """A polling reader's filter runs in its DHT process: entries handed out before never cross
    the pipe again (was: every poll carried every entry of each shard, ~12 MB under a flood)."""
    from hivemind.utils.mpfuture import MPFuture

    writer, reader, round = swarm["nodes"][1], swarm["nodes"][0], rnd(20)
    first = [payload(1, 2000 + i, 512) for i in range(6)]
    assert writer.publish(round, first, later()) == len(first)
    arrived: list[object] = []  # every answer the reader's process takes from its DHT process
    result = MPFuture.result
    monkeypatch.setattr(MPFuture, "result", lambda self, *a, **k: arrived.append(result(self, *a, **k)) or arrived[-1])

    def poll(**options) -> list[bytes]:
        arrived.clear()
        return [item.raw for item in reader.collect(round, True, **options)]

    sliced = poll(budget=2)  # which two is the reader's choice, not the peer's
    assert len(sliced) == 2 and payloads_in(arrived, set(first)) == 2
    rest = poll()
    assert sorted(sliced + rest) == sorted(first) and payloads_in(arrived, set(first)) == 4
    assert poll() == [] and payloads_in(arrived, set(first)) == 0 and arrived  # asked, nothing old came
    later_ones = [payload(1, 3000 + i, 512) for i in range(2)]
    assert writer.publish(round, later_ones, later(), first_index=len(first)) == 2
    assert poll() == later_ones
    assert payloads_in(arrived, set(first) | set(later_ones)) == 2
    # a plain collect still returns every entry, and another transport's reads are its own
    assert sorted(item.raw for item in reader.collect(round)) == sorted(first + later_ones)
    assert sorted(item.raw for item in swarm["nodes"][2].collect(round, True)) == sorted(first + later_ones)


async def reader_caches(dht, node) -> int:
    return len(dht.__dict__.get("_swarm_payload_readers", {}))


def test_a_dht_process_keeps_a_bounded_number_of_reader_caches(swarm):
    from rollover.swarm.payload_cache import MAX_READERS, read_new_in_dht

    node, round = swarm["nodes"][2], rnd(21)
    assert node.publish(round, [b"one"], later()) == 1
    dht = node._dht
    for i in range(MAX_READERS + 3):  # readers the process has never seen each get the entry once
        read = partial(read_new_in_dht, reader=f"reader-{i}", keys=node.shard_keys(round), round=round,
                       shards=SHARDS, max_record_bytes=RECORD, budget=None, prefer=[], max_index=256, timeout=10)
        received, skipped, failures = dht.run_coroutine(read)
        assert [item.raw for item in received] == [b"one"] and failures == {}
    assert dht.run_coroutine(reader_caches) == MAX_READERS


def test_records_at_the_swarm_wide_cap_survive_the_request_pipe(tmp_path):
    """Requests over 16 KiB reach the DHT process in two writes (harden_dht_pipe;
    docs/STACK_NOTES.md, "hivemind"): a record at the swarm-wide cap plus its signature is such a
    request."""
    big = MAX_VALUE_BYTES
    with SwarmTransport(NS, None, max_record_bytes=big, request_timeout=20, **OPTIONS) as node:
        records = [payload(7, i, big) for i in range(5)]
        assert node.publish(rnd(1), records, later()) == 5
        assert sorted(item.raw for item in node.collect(rnd(1))) == sorted(records)
        assert node.is_alive()
    with pytest.raises(SwarmError, match="max_record_bytes"):
        SwarmTransport(NS, None, max_record_bytes=big + 1)


def test_forged_subkey_is_refused_and_counted(swarm):
    nodes, forger, round = swarm["nodes"], swarm["forger"], rnd(2)
    victim = nodes[0]
    marker = victim.identity.public_key_marker
    assert victim.publish(round, [b"honest"], later(300)) == 1
    before = [node.rejection_counts()["bad_signature"] for node in nodes]

    # the forger signs with its own key but claims the victim's subkey, with a later expiration
    stored = forger.store(key=shard_key(round, expected_shard(marker, 0)), subkey=marker + b"/0",
                          value=b"forged", expiration_time=later(600))

    assert stored is False
    for node in nodes:
        mine = [item for item in node.collect(round) if item.sender_key == marker]
        assert [(item.index, item.raw) for item in mine] == [(0, b"honest")]
    after = [node.rejection_counts()["bad_signature"] for node in nodes]
    assert all(a >= b + 1 for a, b in zip(after, before)), (before, after)


def test_unsigned_record_is_refused_by_honest_nodes(swarm, vandal):
    nodes, round = swarm["nodes"], rnd(3)
    assert nodes[1].publish(round, [b"signed"], later()) == 1
    before = [node.rejection_counts()["missing_signature"] for node in nodes]
    vandal.store(key=shard_key(round, 0), subkey=b"anonymous/0", value=b"unsigned", expiration_time=later())
    # the vandal keeps it itself (it has no guard), no honest node does
    assert b"anonymous/0" in vandal.run_coroutine(partial(local_subkeys, key=shard_key(round, 0)))
    for node in nodes:
        assert b"anonymous/0" not in node._dht.run_coroutine(partial(local_subkeys, key=shard_key(round, 0)))

    got = nodes[0].collect(round)

    assert [(item.sender, item.raw) for item in got] == [(nodes[1].identity.sender_id, b"signed")]
    after = [node.rejection_counts()["missing_signature"] for node in nodes]
    assert sum(after) >= sum(before) + 1, (before, after)


def test_oversize_value_is_refused_by_honest_nodes(swarm, vandal):
    nodes, round = swarm["nodes"], rnd(4)
    marker = nodes[2].identity.public_key_marker
    key = shard_key(round, expected_shard(marker, 0))
    assert nodes[2].publish(round, [b"small"], later()) == 1
    before = [node.rejection_counts()["oversized"] for node in nodes]

    vandal.store(key=key, subkey=b"huge/0", value=os.urandom(100 * 1024), expiration_time=later())
    # the vandal keeps it itself (it has no guard), nobody honest does
    assert b"huge/0" in vandal.run_coroutine(partial(local_subkeys, key=key))
    # the same from a peer with a key: properly signed, in its right shard, but 100 KiB
    forger_marker = RSASignatureValidator(swarm["forger_key"]).local_public_key
    swarm["forger"].store(key=shard_key(round, expected_shard(forger_marker, 0)), subkey=forger_marker + b"/0",
                          value=os.urandom(100 * 1024), expiration_time=later())

    for node in nodes:
        assert [item.raw for item in node.collect(round)] == [b"small"]
        assert node.is_alive()
    after = [node.rejection_counts()["oversized"] for node in nodes]
    assert all(a >= b + 1 for a, b in zip(after, before)), (before, after)
    # still serving: a fresh round goes through
    assert nodes[0].publish(round + 100, [b"after"], later()) == 1
    assert [item.raw for item in nodes[1].collect(round + 100)] == [b"after"]


def test_plain_value_cannot_replace_a_shard(swarm, vandal):
    nodes, round = swarm["nodes"], rnd(5)
    marker = nodes[0].identity.public_key_marker
    key = shard_key(round, expected_shard(marker, 0))
    assert nodes[0].publish(round, [b"mine"], later(300)) == 1
    before = nodes[1].rejection_counts()["malformed"]

    # a subkey-less value with a later expiration would replace the whole dictionary where accepted
    vandal.store(key=key, value=b"wipe", expiration_time=later(900))

    assert [item.raw for item in nodes[1].collect(round)] == [b"mine"]
    assert nodes[1].rejection_counts()["malformed"] >= before + 1


def test_publish_refuses_bad_payloads_before_storing(swarm):
    node, round = swarm["nodes"][0], rnd(6)
    with pytest.raises(SwarmError, match="over the 12288-byte record cap"):
        node.publish(round, [b"ok", b"x" * (RECORD + 1)], later())
    with pytest.raises(SwarmError, match="must be bytes"):
        node.publish(round, ["text"], later())
    with pytest.raises(SwarmError, match="not in the future"):
        node.publish(round, [b"late"], get_dht_time() - 1)
    assert node.collect(round) == []  # nothing of the batch was stored
    assert node.publish(round, [b"x" * RECORD], later()) == 1  # exactly the cap is fine


def test_status_round_trip_and_garbage_is_skipped(swarm, vandal):
    nodes, forger = swarm["nodes"], swarm["forger"]
    r7, r8 = rnd(7), rnd(8)
    assert nodes[0].publish_status(r7, {"round": 7, "seen": 2}, later())
    assert nodes[0].publish_status(r8, {"round": 8, "seen": 3}, later())
    assert nodes[1].publish_status(r7, {"round": 7, "rejected": {"oversized": 1}}, later())
    # garbage: a signed non-JSON value, a signed JSON list (both stored: the guard does not parse
    # statuses), and an unsigned subkey (refused by every honest node)
    forger_marker = RSASignatureValidator(swarm["forger_key"]).local_public_key
    assert forger.store(key=f"{NS}/status/r{r7}", subkey=forger_marker, value=b"not json{", expiration_time=later())
    assert forger.store(key=f"{NS}/status/r{r8}", subkey=forger_marker, value=b"[1, 2]", expiration_time=later())
    vandal.store(key=f"{NS}/status/r{r8}", subkey=b"anonymous", value=b"{}", expiration_time=later())
    before = nodes[2].rejection_counts()

    statuses = nodes[2].read_status([r7, r8])

    assert statuses == {
        expected_sender(nodes[0].identity.private_key): {"round": 8, "seen": 3},
        expected_sender(nodes[1].identity.private_key): {"round": 7, "rejected": {"oversized": 1}},
    }
    after = nodes[2].rejection_counts()
    assert after["malformed"] == before["malformed"] + 2
    with pytest.raises(SwarmError, match="not JSON"):
        nodes[0].publish_status(r7 + 2, {"bad": object()}, later())
    with pytest.raises(SwarmError, match="4096-byte record cap"):  # one swarm-wide status cap
        nodes[0].publish_status(r7 + 2, {"big": "x" * 4096}, later())


def test_parse_payload_skips_what_a_peer_could_return():
    marker = RSASignatureValidator(RSAPrivateKey()).local_public_key
    shard = expected_shard(marker, 3)
    ok = parse_payload(marker + b"/3", b"data", round=9, shard=shard, shards=SHARDS, max_record_bytes=RECORD)
    assert ok == Received(sender=sender_of_marker(marker), sender_key=marker, index=3, raw=b"data", round=9)
    cases = [
        (marker + b"/3", 42, "malformed"),  # value not bytes
        (marker + b"/3", {"x": 1}, "malformed"),
        (marker + b"/three", b"data", "malformed"),  # index not an int
        (marker + b"/3/4", b"data", "malformed"),
        ("text/3", b"data", "malformed"),  # subkey not bytes
        (b"anonymous/3", b"data", "missing_signature"),
        (marker + b"/3", b"x" * (RECORD + 1), "oversized"),
    ]
    for subkey, raw, reason in cases:
        assert parse_payload(subkey, raw, round=9, shard=shard, shards=SHARDS,
                             max_record_bytes=RECORD) == reason, subkey
    wrong_shard = (shard + 1) % SHARDS
    assert parse_payload(marker + b"/3", b"data", round=9, shard=wrong_shard, shards=SHARDS,
                         max_record_bytes=RECORD) == "malformed"


def test_restart_keeps_the_peer_id(swarm, tmp_path):
    peers = swarm["nodes"][0].visible_maddrs()
    identity = load_or_create_identity(tmp_path)
    ids = []
    for _ in range(2):
        with SwarmTransport(NS, load_or_create_identity(tmp_path), initial_peers=peers, **OPTIONS) as node:
            ids.append((node.peer_id, node.identity.public_key_marker))
    assert ids[0] == ids[1] == (PeerID.from_identity((tmp_path / "swarm_p2p.key").read_bytes()).to_base58(),
                                identity.public_key_marker)


def test_client_mode_node_publishes_and_collects(swarm):
    peers, round = swarm["nodes"][0].visible_maddrs(), rnd(12)
    with SwarmTransport(NS, None, initial_peers=peers, client_mode=True, **OPTIONS) as client:
        assert client.publish(round, [b"from a client"], later()) == 1
        assert [(item.sender, item.raw) for item in swarm["nodes"][1].collect(round)] == [
            (client.sender, b"from a client")]
        assert client.sender == expected_sender(client.identity.private_key)
        assert [item.raw for item in client.collect(round)] == [b"from a client"]


@pytest.mark.parametrize("options, expected", [
    (dict(host_maddrs=["/ip4/not-an-address/tcp/0"]), "multiaddr"),
    (dict(initial_peers=["garbage"]), "garbage"),
    # nothing listens on port 9: the daemon cannot reach its bootstrap peer
    (dict(initial_peers=["/ip4/127.0.0.1/tcp/9/p2p/QmSwmmvvCQcjoBqSwZYaZ3hu7UibgQQk8bDu7T1imazasr"]), "bootstrap"),
])
def test_start_failure_is_one_line_swarm_error(options, expected):
    transport = SwarmTransport(NS, None, **{"host_maddrs": LOOPBACK, "startup_timeout": 20, **options})
    with pytest.raises(SwarmError) as error:
        transport.start()
    message = str(error.value)
    assert message.startswith("swarm DHT did not start") and expected in message and "\n" not in message
    assert not transport.is_alive()
    with pytest.raises(SwarmError, match="not started"):
        transport.collect(1)


def test_bad_namespace_is_refused():
    with pytest.raises(SwarmError, match="namespace"):
        SwarmTransport("bad namespace", None)


def test_a_bootstrap_with_default_settings_serves_a_swarm_of_8_second_rounds(tmp_path):
    """`rl-swarm bootstrap` started without --round-seconds (was: its guard assumed 30 s rounds
    and refused every record of another swarm as a foreign key)."""
    from rollover.swarm.guard import MAX_ROUND_SECONDS
    from rollover.swarm.config import SwarmConfig

    assert SwarmConfig.model_fields["round_seconds"].metadata  # the guard covers the config's range:
    assert any(getattr(m, "le", None) == MAX_ROUND_SECONDS for m in SwarmConfig.model_fields["round_seconds"].metadata)
    boot = SwarmTransport(NS, load_or_create_identity(tmp_path / "boot"), host_maddrs=LOOPBACK).start()
    writer = reader = None
    try:
        peers = boot.visible_maddrs()
        writer = SwarmTransport(NS, load_or_create_identity(tmp_path / "w"), initial_peers=peers,
                                host_maddrs=LOOPBACK, round_seconds=8.0).start()
        now = int(get_dht_time() // 8.0)
        assert writer.publish(now, [b"eight"], (now + 2) * 8.0) == 1
        writer.shutdown()  # what is read next can only come from the bootstrap node
        reader = SwarmTransport(NS, load_or_create_identity(tmp_path / "r"), initial_peers=peers,
                                host_maddrs=LOOPBACK, round_seconds=8.0).start()
        assert [item.raw for item in reader.collect(now)] == [b"eight"]
        assert boot.rejection_counts()["foreign_key"] == 0
    finally:
        for node in (reader, writer, boot):
            if node is not None:
                node.shutdown()


def test_a_forgery_on_one_replica_does_not_make_our_records_look_lost(tmp_path):
    """hivemind's store returns the answer of the replica that answered last. With two replicas,
    ours (stored at once, locally) and a vandal's that already holds forgeries under our subkeys
    with later expirations, the vandal always answers last and refuses: publish and publish_status
    reported our records lost (was: False, 0) though every honest replica holds them."""
    round = rnd(13)
    with SwarmTransport(NS, load_or_create_identity(tmp_path / "me"), **OPTIONS) as node:
        vandal = DHT(initial_peers=node.visible_maddrs(), start=True, host_maddrs=LOOPBACK)
        try:
            marker = node.identity.public_key_marker
            status = f"{NS}/status/r{round}"
            vandal.store(key=status, subkey=marker, value=b'{"forged": 1}', expiration_time=later(900))
            vandal.store(key=shard_key(round, expected_shard(marker, 0)), subkey=marker + b"/0", value=b"forged",
                         expiration_time=later(900))
            assert vandal.run_coroutine(partial(local_subkeys, key=status)) == [marker]  # the vandal holds it

            assert node.publish_status(round, {"seen": 1}, later()) is True
            assert node.publish(round, [b"honest"], later()) == 1
            assert node.read_status([round]) == {node.sender: {"seen": 1}}
            assert [item.raw for item in node.collect(round)] == [b"honest"]
            # a record no replica took is still reported lost: the same expiration again
            expiration = later(60)
            assert node.publish(round, [b"first"], expiration, first_index=1) == 1
            assert node.publish(round, [b"again"], expiration, first_index=1) == 0
        finally:
            vandal.shutdown()
