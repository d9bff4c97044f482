"""A hostile swarm, for real: every kind of bad record or behaviour we know of, against one honest node.

Real hivemind DHT processes on loopback: an honest receiver A (the node under attack), two honest
established peers B and C, and an attacker DHT ("mallory") that signs whatever it stores with
whichever of its many RSA keys a subkey names (forgeries and key aliases included) and stores
anything. A reads the swarm with its real transport and admits what it read into a real Inbox
with the real arithmetic task, the real builtin:tiny-math tokenizer and policy (LocalJudge) and
the trainer's own scoring; no engine is needed. Every kind is checked for: not trained on,
counted under a reason, no exception in the honest node, and honest peers' records still trained.

One DHT set-up and one publishing phase serve the whole module; each kind is then judged in a
fresh Inbox holding the honest records and that kind's records only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import Counter
from functools import partial
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from rollover.swarm.entries import SIGNATURE_RE, payload_key, shard_of, status_key
from rollover.swarm.identity import load_or_create_identity
from rollover.swarm.inbox import Inbox, Incoming
from rollover.swarm.records import Caps, encode_group
from rollover.swarm.credit import SenderCredit
from rollover.swarm.transport import SwarmTransport, harden_dht_pipe
from rollover.tasks import arithmetic
from rollover.tasks.registry import build_task

pytestmark = pytest.mark.integration

NS = "attacks"
RS = 3600.0  # one round for the whole module (the guard's defaults: one round ahead at most)
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
CAPS = Caps(max_record_bytes=12288, max_completions=16, max_completion_chars=512, max_groups_per_peer=8)
J = 8  # external groups asked for per take: more than any kind's pool, so every candidate is judged
SYBILS = 16
KEYS = 30 + SYBILS  # mallory's keys, made before its DHT starts


# ---- the attacker's tools ---------------------------------------------------------------------------


def marker_of(public_key) -> bytes:
    text = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return b"[owner:" + text + b"]"


def new_key() -> RSAPrivateKey:
    return RSAPrivateKey()


class Signer(RecordValidatorBase):
    """Mallory's validator: accepts everything, signs a subkey naming one of `keys` with that key
    (a marker may map to another's key: a forgery). The DHT process holds a copy made at its
    start: every key must be in `keys` before."""

    def __init__(self, keys: dict[bytes, RSAPrivateKey]):
        self.keys = dict(keys)

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        for marker, key in self.keys.items():
            if marker in record.subkey:
                signature = key.sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
                return record.value + b"[signature:" + signature + b"]"
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return SIGNATURE_RE.sub(b"", record.value)

    @property
    def priority(self) -> int:
        return 10


def huge_exponent_marker() -> bytes:
    """A real 2048-bit modulus with a ~2000-bit public exponent (each check ~300x dearer)."""
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    p, q = numbers.p, numbers.q
    phi = (p - 1) * (q - 1)
    e = (1 << 2000) + 1
    while math.gcd(e, phi) != 1:
        e += 2
    public = rsa.RSAPublicNumbers(e, p * q).public_key()
    return marker_of(public)


async def local_subkeys(dht, node, key):
    """The subkeys a DHT process holds for `key` in its own storage (no network, no decoding)."""
    found = node.protocol.storage.get(DHTID.generate(source=key))
    return [subkey for subkey, _ in found.value.items()] if found is not None else []


# ---- honest content, computed here from the task's own definition ---------------------------------


def numbers_of(task, index):
    record = task.record(index)
    return arithmetic.question_numbers(record["question"])


def honest_group(task, index, variant: int = 0) -> tuple[dict, list[str]]:
    """A right worked solution and three wrong or unfinished ones (informative, steps right);
    another `variant` writes other wrong ones (two honest peers share only the right answer)."""
    numbers = numbers_of(task, index)
    right = arithmetic.solution_text(numbers)
    working, total, shift = right.split("#")[0], sum(numbers), 10 * variant
    return task.record(index)["spec"], [right, f"{working}#{total + 1 + shift}", f"#{total + 2 + shift}",
                                        f"{working[:4]}{variant}"]


def wrong_working(numbers) -> str:
    return "1+1=2;" + f"#{sum(numbers)}"  # the right answer after working that is not this sum's


def raw_json(round_index, spec_text, completions_text) -> bytes:
    return (f'{{"completions":{completions_text},"format":1,"round":{round_index},"spec":{spec_text}}}'
            ).encode()


# ---- the swarm ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if RS - get_dht_time() % RS < 60:  # keep the whole module inside one round
        time.sleep(RS - get_dht_time() % RS + 1)
    folder = tmp_path_factory.mktemp("attacks")
    nodes, dhts = [], []
    try:
        a = SwarmTransport(NS, load_or_create_identity(folder / "a"), host_maddrs=LOOPBACK, round_seconds=RS,
                           max_record_bytes=16384).start()
        nodes.append(a)
        peers = a.visible_maddrs()
        for name in ("b", "c"):
            nodes.append(SwarmTransport(NS, load_or_create_identity(folder / name), initial_peers=peers,
                                        host_maddrs=LOOPBACK, round_seconds=RS).start())
        pool = [new_key() for _ in range(KEYS)]
        markers = [marker_of(key._private_key.public_key()) for key in pool]
        first = pool[0]
        aliased = {markers[0][:-1] + b" alias-1]": first, huge_exponent_marker(): first,
                   nodes[1].identity.public_key_marker: first}  # B's marker with mallory's key: forgeries
        signer = Signer({**dict(zip(markers, pool)), **aliased})
        mallory = DHT(initial_peers=peers, start=True, host_maddrs=LOOPBACK, record_validators=[signer])
        dhts.append(mallory)
        harden_dht_pipe(mallory)
        yield build_world(nodes, mallory, list(zip(markers, pool)), list(aliased))
    finally:
        for dht in dhts:
            dht.shutdown()
        for node in nodes:
            node.shutdown()


class Attack:
    """Where mallory writes: a new key per slot group, indices 0..7 under it."""

    def __init__(self, mallory, pool, round_index):
        self.mallory, self.pool, self.round = mallory, list(pool), round_index
        self.keys: list[tuple[bytes, RSAPrivateKey]] = []

    def key(self) -> tuple[bytes, RSAPrivateKey]:
        marker, key = self.pool.pop(0)
        self.keys.append((marker, key))
        return marker, key

    def store(self, marker: bytes, index: int | bytes, value: bytes, round_index: int | None = None,
              expiration: float | None = None, key: str | None = None, shard: int | None = None) -> bool:
        round_index = self.round if round_index is None else round_index
        suffix = index if isinstance(index, bytes) else str(index).encode()
        if shard is None:
            shard = shard_of(marker, int(suffix), 4) if suffix.isdigit() else 0
        return bool(self.mallory.store(
            key=key or payload_key(NS, round_index, shard), subkey=marker + b"/" + suffix, value=value,
            expiration_time=expiration or (round_index + 2) * RS))


def build_world(nodes, mallory, pool, aliased):
    from rollover.trainer.config import Recipe
    from rollover.trainer.external import LocalJudge
    from rollover.trainer.group_scorer import GroupScorer
    from rollover.trainer.policy import Policy
    from rollover.tasks.rewards import RewardRunner

    a, b, c = nodes
    recipe = Recipe()
    task = build_task(recipe.task)
    policy = Policy(recipe.model, recipe.train.lora, device=None)
    scorer = GroupScorer(RewardRunner.from_config(recipe.task, task), recipe.algo, recipe.rollout.max_tokens)
    judge = LocalJudge(recipe, policy, scorer)
    now = int(get_dht_time() // RS)
    attack = Attack(mallory, pool, now)
    world = SimpleNamespace(a=a, b=b, c=c, mallory=mallory, task=task, judge=judge, policy=policy, round=now,
                            attack=attack, dht={}, kinds={}, honest=[])

    # Honest peers B and C publish one group each, A one of its own (noted as ours).
    expires = (now + 2) * RS
    spec_b, comps_b = honest_group(task, 101)
    spec_c, comps_c = honest_group(task, 101, variant=1)  # the same task as B's, its own samples
    spec_a, comps_a = honest_group(task, 103)
    assert b.publish(now, [encode_group(now, spec_b, comps_b)], expires) == 1
    assert c.publish(now, [encode_group(now, spec_c, comps_c)], expires) == 1
    assert a.publish(now, [encode_group(now, spec_a, comps_a)], expires) == 1
    spec_old, comps_old = honest_group(task, 104)  # B's group of the previous round
    old_raw = encode_group(now - 1, spec_old, comps_old)
    assert b.publish(now - 1, [old_raw], now * RS + RS) == 1
    world.honest = [(b.sender, 0), (c.sender, 0)]
    world.own = (a.sender, now, spec_a, comps_a)

    # ---- attacks the DHT guard must refuse (each against A's storage and counters) ----
    m1, k1 = attack.key()
    b_marker = b.identity.public_key_marker
    ok_value = encode_group(now, *honest_group(task, 150))
    alias, huge = aliased[:2]  # huge: its "signature" cannot be valid; refused before any check
    dht_attacks = {
        "oversized_value": (dict(marker=m1, index=1, value=b"x" * 20000), "oversized"),
        "unsigned_subkey": (dict(marker=b"anonymous", index=0, value=ok_value, shard=0), "missing_signature"),
        "forged_owner": (dict(marker=b_marker, index=5, value=b"forged"), "bad_signature"),
        "index_out_of_range": (dict(marker=m1, index=300, value=ok_value), "index_out_of_range"),
        "noncanonical_index": (dict(marker=m1, index=b"01", value=ok_value, shard=shard_of(m1, 1, 4)), "malformed"),
        "wrong_shard": (dict(marker=m1, index=2, value=ok_value, shard=(shard_of(m1, 2, 4) + 1) % 4), "malformed"),
        "far_future_expiration": (dict(marker=m1, index=3, value=ok_value, expiration=get_dht_time() + 10 * 365 * 86400),
                                  "far_expiration"),
        "foreign_namespace": (dict(marker=m1, index=4, value=ok_value, key=f"elsewhere/r{now}/s0"), "foreign_key"),
        "far_future_round": (dict(marker=m1, index=5, value=ok_value, round_index=now + 5), "foreign_key"),
        "key_alias": (dict(marker=alias, index=0, value=ok_value), "bad_key"),
        "huge_exponent": (dict(marker=huge, index=0, value=ok_value), "bad_key"),
        "status_spoof": (dict(marker=b_marker, index=b"", value=b'{"rejected":{}}', key=status_key(NS, now)),
                         "bad_signature"),
    }
    for kind, (options, reason) in dht_attacks.items():
        before = Counter(a.rejection_counts())
        if kind == "status_spoof":  # a status subkey is the bare marker
            stored = bool(mallory.store(key=options["key"], subkey=b_marker, value=options["value"],
                                        expiration_time=(now + 2) * RS))
            key_text, subkey = options["key"], b_marker
        else:
            stored = attack.store(**options)
            suffix = options["index"] if isinstance(options["index"], bytes) else str(options["index"]).encode()
            subkey = options["marker"] + b"/" + suffix
            key_text = options.get("key") or payload_key(NS, options.get("round_index", now), options.get(
                "shard", shard_of(options["marker"], int(suffix), 4) if suffix.isdigit() else 0))
        delta = Counter(a.rejection_counts()) - before
        held = {node.sender: subkey in node._dht.run_coroutine(partial(local_subkeys, key=key_text))
                for node in nodes}
        world.dht[kind] = dict(reason=reason, delta=delta, held=held, stored=stored, subkey=subkey)
    # an unsigned plain value meant to replace a whole shard dictionary
    before = Counter(a.rejection_counts())
    mallory.store(key=payload_key(NS, now, 0), value=b"wipe", expiration_time=(now + 3) * RS)
    world.dht["plain_value"] = dict(reason="malformed", delta=Counter(a.rejection_counts()) - before,
                                    held={}, stored=None, subkey=None)

    # ---- records the DHT carries (signed, well placed) that the Inbox or the judge must refuse ----
    def kind(name, reasons, *items):
        world.kinds[name] = dict(reasons=set(reasons), items=list(items))

    def slot(values_by_index):
        marker = attack.key()[0]
        for index, value in values_by_index:
            before = Counter(a.rejection_counts())
            assert attack.store(marker, index, value), \
                f"the DHT refused {value[:60]!r}: {dict(Counter(a.rejection_counts()) - before)}"
        return [(marker, index) for index, value in values_by_index]

    spec_index = next(i for i in range(120, 400) if sum(numbers_of(task, i)) >= 100)  # a 3-digit answer
    spec, comps = honest_group(task, spec_index)
    numbers = numbers_of(task, spec_index)
    spec_text = json.dumps(spec)
    kind("nesting_bomb", {"malformed"}, *slot([(0, raw_json(now, spec_text, "[" * 5000 + "]" * 5000))]))
    kind("lone_surrogate_completion", {"malformed"}, *slot([(0, raw_json(now, spec_text, '["\\ud800#1","#2"]'))]))
    kind("lone_surrogate_spec", {"malformed", "unknown_task"},
         *slot([(0, raw_json(now, json.dumps({**spec, "task": "x"})[:-1] + ',"n":"\\udfff"}', '["#1","#2"]'))]))
    kind("malformed_json", {"malformed"}, *slot([(0, b"{not json")]))
    kind("not_utf8", {"not_utf8"}, *slot([(0, b"\xff\xfe\x00garbage")]))
    kind("wrong_types", {"malformed"}, *slot([(0, raw_json(f'"{now}"', spec_text, '["#1"]')),
                                               (1, raw_json(now, spec_text, "[1, 2]"))]))
    kind("nan_in_spec", {"malformed"}, *slot([(0, raw_json(now, json.dumps(spec)[:-1] + ',"x":NaN}', '["#1","#2"]'))]))
    kind("record_too_big", {"oversized"}, *slot([(0, encode_group(now, spec, [comps[0] + " " * 13000, *comps[1:]]))]))
    kind("too_many_completions", {"too_many_completions"},
         *slot([(0, encode_group(now, spec, [f"{c}{i}" for i in range(5) for c in comps]))]))
    kind("completion_too_long", {"completion_too_long"},
         *slot([(0, encode_group(now, spec, [comps[0] + "0" * 600, *comps[1:]]))]))
    kind("too_many_groups", {"too_many_groups"},
         *slot([(9, encode_group(now, *honest_group(task, 121)))]))
    dup = encode_group(now, *honest_group(task, 122))
    kind("duplicate", {"duplicate"}, *slot([(0, dup), (1, dup)]))
    world.kinds["duplicate"]["trained_once"] = True  # the first is a fine group: trained once
    kind("replay_into_later_round", {"replayed"}, *slot([(0, old_raw)]))
    skew_marker = attack.key()[0]  # a peer whose clock runs a round ahead
    assert attack.store(skew_marker, 0, encode_group(now + 1, *honest_group(task, 123)), round_index=now + 1)
    world.kinds["clock_skew"] = dict(reasons={"wrong_round"}, items=[(skew_marker, 0)], round=now + 1)
    kind("verbatim_copy", {"copied"}, *slot([(0, encode_group(now, spec_b, comps_b))]))
    kind("whitespace_copy", {"copied"},
         *slot([(0, encode_group(now, spec_b, [c.replace(";", "; ") + " \u200b" for c in comps_b]))]))
    # one completion from each honest group of that task, and none of its own
    kind("mixed_copy", {"copied"}, *slot([(0, encode_group(now, spec_b, [comps_b[1], comps_c[1], comps_b[2], comps_c[2]]))]))
    kind("own_records_echoed", {"copied"}, *slot([(0, encode_group(now, spec_a, comps_a))]))
    kind("seed_true", {"unknown_task", "copied"},
         *slot([(0, encode_group(now, {**spec, "seed": bool(spec["seed"])}, comps))]))
    kind("seed_float", {"unknown_task", "copied"},
         *slot([(0, encode_group(now, {**spec, "seed": float(spec["seed"])}, comps))]))
    kind("absurd_parameters", {"unknown_task"},
         *slot([(0, encode_group(now, {**spec, "operands": 10**6, "digits_max": 10**6}, comps))]))
    kind("unknown_task", {"unknown_task"}, *slot([(0, encode_group(now, {**spec, "task": "made_up"}, comps))]))
    kind("held_out_set", {"unknown_task"},
         *slot([(0, encode_group(now, {**spec, "seed": spec["seed"] + 1_000_003}, comps))]))
    eos = policy.tokenizer.eos_token
    answer = str(sum(numbers))
    working = comps[0].split("#")[0]
    # "#4</s>42" reads "#442" once the special token is skipped, but teaches stopping after "#4"
    kind("special_tokens", {"uninformative", "wrong_steps"},
         *slot([(0, encode_group(now, spec, [f"{working}#{answer[0]}{eos}{answer[1:]}", working]))]))
    kind("right_answer_after_wrong_working", {"wrong_steps", "uninformative"},
         *slot([(0, encode_group(now, spec, [wrong_working(numbers), f"{working}#{sum(numbers) + 1}"]))]))
    sybil_items = []
    for _ in range(SYBILS):
        marker = attack.key()[0]
        for index in range(2):
            assert attack.store(marker, index, encode_group(now, *honest_group(task, 200 + len(sybil_items))))
            sybil_items.append((marker, index))
    kind("sybil_flood", {"new_senders"}, *sybil_items)
    world.late_copy = encode_group(now + 3, spec_b, comps_b)
    return world


# ---- A's view -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read(world):
    """What A's transport read from the swarm (one poll of the current and previous round)."""
    from rollover.swarm.identity import sender_id

    got = {}
    for round_index in (world.round - 1, world.round, world.round + 1):
        for item in world.a.collect(round_index):
            got[(item.sender, item.round, item.index)] = item
    world.sender_of = {marker: sender_id(marker) for marker, _ in world.attack.keys}
    return got


def established_credit(world) -> SenderCredit:
    credit = SenderCredit()
    for sender, _ in world.honest:
        for _ in range(6):
            credit.record(sender, useful=True)
    return credit


def honest_incoming(world, read):
    return [Incoming(s, world.round, i, read[(s, world.round, i)].raw) for s, i in world.honest]


def judge_kind(world, read, name):
    """A fresh Inbox: the honest records (one poll), then this kind's records (the next poll),
    then one take. Returns (rejected delta of the kind's poll and the take, taken senders,
    the taken groups, the kind's senders)."""
    spec = world.kinds[name]
    round_index = spec.get("round", world.round)
    box = Inbox(world.task, CAPS, likelihood_z=6.0)
    sender, r, spec_a, comps_a = world.own
    box.note_own(sender, r, spec_a, comps_a)
    credit = established_credit(world)
    box.admit(honest_incoming(world, read), world.round, credit)
    assert not box.rejected, dict(box.rejected)
    senders = {world.sender_of[m] for m, _ in spec["items"]}
    items = []
    for marker, index in spec["items"]:
        found = read.get((world.sender_of[marker], round_index, index))
        assert found is not None, f"{name}: A did not read {index} of {world.sender_of[marker]}"
        items.append(Incoming(found.sender, found.round, found.index, found.raw))
    items.sort(key=lambda item: (item.sender, item.index))  # as the transport delivers them
    box.admit(items, world.round, credit)
    taken = box.take(J, world.judge, credit, 0.5, random.Random(0), max_judged=64)
    return box.rejected, taken, senders, credit


# ---- the checks -----------------------------------------------------------------------------------

DHT_KINDS = ["oversized_value", "unsigned_subkey", "forged_owner", "index_out_of_range", "noncanonical_index",
             "wrong_shard", "far_future_expiration", "foreign_namespace", "far_future_round", "key_alias",
             "huge_exponent", "status_spoof", "plain_value"]
INBOX_KINDS = ["nesting_bomb", "lone_surrogate_completion", "lone_surrogate_spec", "malformed_json", "not_utf8",
               "wrong_types", "nan_in_spec", "record_too_big", "too_many_completions", "completion_too_long",
               "too_many_groups", "duplicate", "replay_into_later_round", "clock_skew", "verbatim_copy",
               "whitespace_copy", "mixed_copy", "own_records_echoed", "seed_true", "seed_float",
               "absurd_parameters", "unknown_task", "held_out_set", "special_tokens",
               "right_answer_after_wrong_working"]


@pytest.mark.parametrize("kind", DHT_KINDS)
def test_the_dht_guard_refuses(world, read, kind):
    verdict = world.dht[kind]
    assert verdict["delta"][verdict["reason"]] >= 1, (kind, dict(verdict["delta"]))
    assert not any(verdict["held"].values()), f"{kind}: an honest node stored it: {verdict['held']}"
    assert world.a.is_alive() and world.b.is_alive() and world.c.is_alive()
    # nothing of mallory's first key reached A's reading (all its DHT attacks were refused), and
    # the honest records did
    assert not [k for k in read if k[0] == world.sender_of[world.attack.keys[0][0]]]
    for sender, index in world.honest:
        assert (sender, world.round, index) in read


def test_forged_records_do_not_replace_the_owners(world, read):
    b = world.b.sender
    assert [read[k].raw for k in read if k[0] == b and k[1] == world.round] == [
        encode_group(world.round, *honest_group(world.task, 101))]
    statuses = world.c.read_status([world.round])
    assert b not in statuses  # the spoofed status under B's key was refused everywhere


@pytest.mark.parametrize("kind", INBOX_KINDS)
def test_the_inbox_refuses(world, read, kind):
    rejected, taken, senders, credit = judge_kind(world, read, kind)
    expected = world.kinds[kind]["reasons"]
    assert any(rejected[reason] > 0 for reason in expected), (kind, dict(rejected))
    taken_senders = [c.sender for c, _ in taken]
    allowed = 1 if world.kinds[kind].get("trained_once") else 0
    assert sum(s in senders for s in taken_senders) <= allowed, f"{kind}: trained on {senders & set(taken_senders)}"
    honest = {s for s, _ in world.honest}
    assert honest <= set(taken_senders), f"{kind}: honest groups not trained: {taken_senders}, {dict(rejected)}"
    for candidate, group in taken:  # no peer text became a special token (eos ends a sample only)
        special = set(world.policy.tokenizer.all_special_ids)
        for sample in group.samples:
            assert not special & set(sample.response_ids[:-1]), (kind, candidate.sender, sample.response_ids)
    if not allowed:
        assert all(credit.useful.get(s, 0) == 0 for s in senders), f"{kind}: credit earned by the attacker"


def test_a_sybil_flood_is_bounded_and_honest_peers_still_trained(world, read):
    rejected, taken, senders, credit = judge_kind(world, read, "sybil_flood")
    assert rejected["new_senders"] >= 2 * (SYBILS - 8), dict(rejected)  # 8 new senders per round
    assert {s for s, _ in world.honest} <= {c.sender for c, _ in taken}


def test_a_late_verbatim_copy_is_not_trained_again(world, read):
    box = Inbox(world.task, CAPS, likelihood_z=6.0)
    credit = established_credit(world)
    box.admit(honest_incoming(world, read), world.round, credit)
    late = world.round + 3  # after the two rounds a record lives
    box.admit([Incoming(world.sender_of[world.attack.keys[0][0]], late, 0, world.late_copy)], late, credit)
    assert box.rejected["copied"] >= 1, dict(box.rejected)


def test_a_hostile_status_cannot_crash_or_drive_the_terminal(world, capsys):
    from rollover.swarm.cli import main

    now = world.round
    hostile = [{"round": now, "rejected": [1]},
               {"round": now, "rejected": {"[/]": 1, "[bold]x": 2, "\x1b[2J\x1b]0;pwned\x07": 3}}]
    for status in hostile:
        marker, key = world.attack.key()
        assert world.mallory.store(key=status_key(NS, now), subkey=marker, value=json.dumps(status).encode(),
                                   expiration_time=(now + 2) * RS)
    assert world.b.publish_status(now, {"round": now, "rejected": {"copied": 2}}, (now + 2) * RS)
    code = main(["status", "--peers", *world.a.visible_maddrs(), "--name", NS, "--round-seconds", str(RS),
                 "--rounds", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert world.b.sender in out and "copied 2" in out and "[/] 1" in out
