"""A real swarm on this machine: `rl-swarm local` with two different nodes and a hostile peer.

Node 0 runs builtin:tiny-math; node 1 runs builtin:tiny-math-wide, a model of another width
and another vocabulary, so the two can only exchange text. A third peer, run by this test over
the same DHT, publishes every kind of bad record it can sign. The swarm must: train both nodes
on each other's groups (the audit logs name the other node), never train on the hostile peer's
groups, count what it sent by reason, answer `rl-swarm status`, and stop cleanly on Ctrl-C
with a checkpoint per node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rollover.swarm.records import encode_group, round_at
from rollover.tasks import arithmetic

pytestmark = pytest.mark.integration

ROUND_SECONDS = 4.0
RL_SWARM = [sys.executable, "-m", "rollover.swarm.cli"]
SETTINGS = ["train.steps=100000",  # the test stops the swarm with Ctrl-C; no node may finish first
             "train.eval_every=1000", "train.save_every=1000", "task.eval_size=16",
            "rollout.groups_per_step=4", "rollout.group_size=8", "tracking.wandb=disabled",
            f"swarm.round_seconds={ROUND_SECONDS}", "swarm.external_groups=2"]


def node_id(folder: Path) -> str | None:
    log = folder / "console.log"
    found = re.search(r"swarm: joined as peer (\S+);", log.read_text()) if log.is_file() else None
    return found.group(1) if found else None


def audit(folder: Path) -> list[dict]:
    path = folder / "swarm_audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def senders_trained_on(folder: Path) -> set[str]:
    return {g["sender"] for line in audit(folder) for g in line["external"]}


def hostile_records(round_index: int, honest: list) -> list[bytes]:
    """Signed by the hostile peer itself; each is bad in one way."""
    spec = {"task": "arithmetic", "seed": 0, "index": 3, "digits_min": 1, "digits_max": 3, "operands": 2}
    numbers = arithmetic.make_problem(0, 3, 1, 3, 2, None)
    right, wrong = f"#{sum(numbers)}", f"#{sum(numbers) + 1}"
    records = [
        b"{not json",
        b"\xff\xfe\x00",
        encode_group(round_index - 1, spec, [right, wrong]),  # last round's record under this round
        encode_group(round_index, {**spec, "task": "made_up"}, [right, wrong]),
        encode_group(round_index, {**spec, "seed": 1_000_003}, [right, wrong]),  # our held-out set
        encode_group(round_index, {**spec, "index": 4}, [wrong, f"#{sum(numbers) + 2}"]),  # "all right"
        # Correct-looking but written by no arithmetic model: far below the node's own likelihood.
        encode_group(round_index, {**spec, "index": 5}, [f"zq}}~|`^ {right}", f"~`|{{^zq {wrong}"]),
    ]
    for item in honest[:2]:  # another peer's records, re-signed as ours: its very bytes (which the
        records.append(item.raw)  # read cache hands out once), and its text in another order
        original = json.loads(item.raw)
        records.append(encode_group(round_index, original["spec"], original["completions"][::-1]))
    return records


def test_local_swarm_of_two_models_trains_on_each_other_and_refuses_a_hostile_peer(tmp_path):
    from rollover.swarm.identity import load_or_create_identity
    from rollover.swarm.transport import SwarmTransport

    out = tmp_path / "swarm"
    command = [*RL_SWARM, "local", "recipes/grpo_math.yaml", "--nodes", "2", "--out", str(out),
               "--node", "1:model.path=builtin:tiny-math-wide", *SETTINGS]
    local = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "COLUMNS": "160"})
    hostile = None
    try:
        deadline = time.monotonic() + 120
        while not (out / "peers.txt").is_file():
            assert local.poll() is None, local.stdout.read()
            assert time.monotonic() < deadline, "no bootstrap peer"
            time.sleep(0.5)
        peers = (out / "peers.txt").read_text().split()
        hostile = SwarmTransport("rollover", load_or_create_identity(tmp_path / "hostile"), initial_peers=peers,
                                 host_maddrs=["/ip4/127.0.0.1/tcp/0"], round_seconds=ROUND_SECONDS)
        hostile.start()
        nodes = [out / "node-0", out / "node-1"]
        deadline = time.monotonic() + 420
        sent_rounds, stored = set(), {}
        while True:
            assert local.poll() is None, f"rl-swarm local exited {local.returncode}"
            ids = [node_id(n) for n in nodes]
            if all(ids) and ids[1] in senders_trained_on(nodes[0]) and ids[0] in senders_trained_on(nodes[1]) \
                    and len(sent_rounds) >= 3:
                break
            assert time.monotonic() < deadline, f"no exchange: ids {ids}, audits {[audit(n)[-2:] for n in nodes]}"
            now = round_at(time.time(), ROUND_SECONDS)
            if all(ids) and now not in sent_rounds:
                honest = [i for i in hostile.collect(now) + hostile.collect(now - 1) if i.sender in ids]
                stored[now] = hostile.publish(now, hostile_records(now, honest), (now + 2) * ROUND_SECONDS)
                sent_rounds.add(now)
            time.sleep(1.0)
        # Records live two rounds: keep the hostile peer publishing while `status` starts and reads.
        stop_hostile = threading.Event()

        def keep_publishing() -> None:
            while not stop_hostile.wait(ROUND_SECONDS / 2):
                now = round_at(time.time(), ROUND_SECONDS)
                hostile.publish(now, hostile_records(now, []), (now + 2) * ROUND_SECONDS)

        publisher = threading.Thread(target=keep_publishing, daemon=True)
        publisher.start()
        # Records (status included) expire two rounds after their own, and the wide model's node
        # publishes once per step (several rounds apart on two cores): a status read sees a peer
        # only if it published in the last two rounds, so read until every peer has shown up.
        status_deadline = time.monotonic() + 120
        while True:
            status = subprocess.run([*RL_SWARM, "status", "--peers", *peers, "--round-seconds",
                                     str(ROUND_SECONDS), "--rounds", "12"], capture_output=True, text=True,
                                    timeout=120, env={**os.environ, "COLUMNS": "200"})
            assert status.returncode == 0, status.stderr
            if all(peer in status.stdout for peer in (hostile.sender, *ids)) or time.monotonic() > status_deadline:
                break
            time.sleep(2.0)
        assert hostile.sender in status.stdout and ids[0] in status.stdout and ids[1] in status.stdout, \
            status.stdout
        assert "malformed" in status.stdout  # the nodes publish what they turned away
        stop_hostile.set()
        publisher.join()
        local.send_signal(signal.SIGINT)  # Ctrl-C: every node saves and stops
        assert local.wait(timeout=300) == 130
    finally:
        if "stop_hostile" in locals():
            stop_hostile.set()
            publisher.join()
        if hostile is not None:
            hostile.shutdown()
        if local.poll() is None:  # a failed check: stop the swarm as a user would
            local.send_signal(signal.SIGINT)
            try:
                local.wait(timeout=240)
            except subprocess.TimeoutExpired:
                local.kill()
    # Each node draws its own problems: a peer's groups come from the peer's part of the task's
    # stream (it starts at the peer's sender id mod 2^61), not from the problems the node drew.
    for folder, peer in ((nodes[0], ids[1]), (nodes[1], ids[0])):
        start = int(peer, 16) % 2**61
        indices = [g["spec"]["index"] for line in audit(folder) for g in line["external"] if g["sender"] == peer]
        assert indices and all(start <= i < start + 10**5 for i in indices), (peer, indices)
    for folder in nodes:
        assert sorted((folder / "checkpoints").glob("step-*")), f"{folder}: no checkpoint on Ctrl-C"
        # The hostile peer republishes honest records in their own round: read in the same poll as
        # the original, the copy may be the one kept (who wrote it cannot be known then). Such a
        # group is honest text, trained once, marked contested and credited to no one; none of
        # the hostile peer's own records is ever trained on.
        from_hostile = [g for line in audit(folder) for g in line["external"] if g["sender"] == hostile.sender]
        assert all(g["contested"] for g in from_hostile), f"a hostile group was trained on: {from_hostile}"
        rejected: dict[str, float] = {}
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for entry in metrics:
            rejected.update({k.split("/")[-1]: v for k, v in entry.items() if k.startswith("swarm/rejected/")})
        for reason in ("malformed", "not_utf8", "replayed", "unknown_task", "copied"):
            assert rejected.get(reason, 0) > 0, f"{folder.name}: no {reason} counted: {rejected}"
        assert any(entry.get("swarm/external_groups", 0) > 0 and entry.get("updates", 0) > 0 for entry in metrics)
        assert any(entry.get("swarm/external_share", 0) > 0 and "swarm/round_lag" in entry for entry in metrics)
        other = ids[1 - nodes.index(folder)]
        last = metrics[-1]
        assert last.get(f"swarm/used/{other}", 0) > 0 and f"swarm/credit/{other}" in last
        assert last.get(f"swarm/used/{hostile.sender}", 0) == len(from_hostile)
        assert last.get(f"swarm/credit/{hostile.sender}", 0.0) <= 0.5  # it earned nothing
    # The hostile groups judged in full were refused on their re-scored rewards (its "all right"
    # answers are wrong, and its garbage text fails the worked-steps check). No `unlikely` count
    # is asserted: the honest peers here must not trip the likelihood filter (issue 25), and
    # the filter's refusals of poison are tested on real models in tests/unit/test_swarm_likelihood.py.
    judged = {}
    for folder in nodes:
        for entry in (json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()):
            for reason in ("uninformative", "unlikely"):
                judged[reason] = max(judged.get(reason, 0), entry.get(f"swarm/rejected/{reason}", 0))
    assert judged["uninformative"] > 0, judged
