"""A swarm's life on this machine: three nodes exchange and train, one is killed mid-round, and it
comes back later as the same peer and catches up.

Real `rl-swarm local` with three training processes (each its own vLLM engine) and a real
`rl-swarm join` for the comeback, over hivemind's DHT on loopback. What is checked comes from the
nodes' own files (console lines, audit logs, metrics), never from the code under test:
- every node trains on groups from both others (the audit names them);
- after node 2 is SIGKILLed (engine and DHT with it), the survivors keep stepping and no step
  waits on the swarm for as long as a round (`time/swarm`), so no one is held past a deadline;
- node 2 restarted from its run folder, beside the survivors still stepping (its engine start is
  not starved by theirs), joins under the same peer id (its key persists), works in
  the swarm's current round rather than a counter of its own, trains on the survivors' groups,
  and they train on its new ones;
- Ctrl-C stops what is left, each with a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollover.swarm.records import round_at

pytestmark = pytest.mark.integration

ROUND_SECONDS = 4.0
RL_SWARM = [sys.executable, "-m", "rollover.swarm.cli"]
RECIPE = "recipes/grpo_math.yaml"
SETTINGS = ["train.steps=100000", "train.eval_every=100000", "train.save_every=100000", "task.eval_size=16",
            "rollout.groups_per_step=2", "rollout.group_size=8", "tracking.wandb=disabled",
            f"swarm.round_seconds={ROUND_SECONDS}", "swarm.external_groups=2"]


def peer_ids(log: Path) -> list[str]:
    """Every 'joined as peer' line of a console log, in order (one per start)."""
    return re.findall(r"swarm: joined as peer (\S+);", log.read_text()) if log.is_file() else []


def audit(folder: Path) -> list[dict]:
    path = folder / "swarm_audit.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def steps(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [row for row in (json.loads(line) for line in lines if line.strip().endswith("}")) if "time/step" in row]


def senders(lines: list[dict]) -> set[str]:
    return {group["sender"] for line in lines for group in line["external"]}


def wait_for(condition, timeout: float, what, *processes: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            assert process.poll() is None, f"exited {process.returncode} while waiting for: {what()}"
        assert time.monotonic() < deadline, f"timed out waiting for: {what()}"
        time.sleep(1.0)


def node_pid(folder: Path) -> int:
    """The pid of the `rl-swarm join` process writing into `folder` (the leader of its process
    group): the oldest match, as forked children (hivemind's DHT process) share its command line."""
    found = subprocess.run(["pgrep", "-o", "-f", f"train.output_dir={folder}( |$)"], capture_output=True, text=True)
    assert found.stdout.strip(), f"no node process for {folder}"
    pid = int(found.stdout.split()[0])
    assert os.getpgid(pid) == pid, "a node runs in its own session (rl-swarm local starts it so)"
    return pid


def stop(process: subprocess.Popen | None, timeout: float = 240) -> int | None:
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def test_three_nodes_train_together_survive_a_killed_peer_and_take_it_back(tmp_path):
    out = tmp_path / "swarm"
    nodes = [out / f"node-{i}" for i in range(3)]
    local = subprocess.Popen([*RL_SWARM, "local", RECIPE, "--nodes", "3", "--out", str(out), *SETTINGS],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "COLUMNS": "160"})
    comeback = None
    try:
        # 1. Three nodes: each trains on groups from both others.
        def ids() -> list[str | None]:
            return [(peer_ids(n / "console.log") or [None])[0] for n in nodes]

        def everyone_shared() -> bool:
            known = ids()
            return all(known) and all(set(known) - {known[i]} <= senders(audit(n)) for i, n in enumerate(nodes))

        wait_for(everyone_shared, 480, lambda: (ids(), [audit(n)[-1:] for n in nodes]), local)
        first = ids()
        assert len(set(first)) == 3

        # 2. Node 2 dies mid-round (engine and DHT process with it): the survivors step on.
        os.killpg(node_pid(nodes[2]), signal.SIGKILL)
        seen = [len(steps(n)) for n in nodes[:2]]
        wait_for(lambda: all(len(steps(n)) >= k + 6 for n, k in zip(nodes[:2], seen)), 240,
                 lambda: [len(steps(n)) for n in nodes[:2]], local)
        for folder, k in zip(nodes[:2], seen):
            waits = [row["time/swarm"] for row in steps(folder)[k:]]
            assert max(waits) < ROUND_SECONDS, f"{folder.name} waited on the swarm: {waits}"

        # 3. Node 2 comes back from its run folder beside the running survivors: same peer, the
        # swarm's current round. Its vLLM start must come up while two engines step flat out on
        # two cores: before rollout/vllm_plugin.py, their shared-memory queue readers spun through
        # every idle moment and starved it (no start within 7 min, even at nice 19).
        peers = (out / "peers.txt").read_text().split()
        rejoined_at = round_at(time.time(), ROUND_SECONDS)
        audited_before = [len(audit(n)) for n in nodes]  # node 2's own log goes on in its folder
        with (tmp_path / "comeback.log").open("w") as log:
            comeback = subprocess.Popen(
                [*RL_SWARM, "join", RECIPE, "--peers", *peers, *SETTINGS, "train.seed=2", "rollout.seed=2",
                 f"train.output_dir={nodes[2]}", "swarm.host_maddrs=[/ip4/127.0.0.1/tcp/0]",
                 "train.resume=true"], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "160"})
        wait_for(lambda: peer_ids(tmp_path / "comeback.log"), 420,
                 lambda: (tmp_path / "comeback.log").read_text()[-500:], comeback)

        def fresh_from(folder: Path, sender: str) -> bool:
            """Trained on a group `sender` published since the comeback (not one from before the kill)."""
            return any(g["sender"] == sender and g["round"] >= rejoined_at
                       for line in audit(folder) for g in line["external"])

        def taken_back() -> bool:
            new = audit(nodes[2])[audited_before[2]:]
            return {first[0], first[1]} <= senders(new) and fresh_from(nodes[0], first[2]) \
                and fresh_from(nodes[1], first[2])

        wait_for(taken_back, 480, lambda: (peer_ids(tmp_path / "comeback.log"),
                                           [audit(n)[-1:] for n in nodes]), local, comeback)
        assert peer_ids(tmp_path / "comeback.log") == [first[2]]  # the same peer id as before the kill
        rounds = [line["round"] for line in audit(nodes[2])[audited_before[2]:]]
        assert rounds[0] >= rejoined_at and rounds == sorted(rounds)
        assert rounds[-1] <= round_at(time.time(), ROUND_SECONDS)

        # 4. Ctrl-C: the comeback and the swarm stop, each with a checkpoint.
        assert stop(comeback) == 130
        assert stop(local) == 130
    finally:
        stop(comeback)
        stop(local)
    for folder in nodes:
        assert sorted((folder / "checkpoints").glob("step-*")), f"{folder}: no checkpoint on Ctrl-C"
