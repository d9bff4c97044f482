"""`rl-swarm local`: a whole swarm on one machine — a bootstrap peer and N training nodes.

Each node is a real `rl-swarm join` process with its own run folder (`<out>/node-<i>`), seed
and identity; they meet over the DHT on loopback exactly as machines would. One live table
shows them all. Ctrl-C stops every node the way Ctrl-C stops `rl-train` (each saves a
checkpoint); running the same command again resumes them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from rollover.tasks.errors import EXIT_USAGE

STOP_GRACE_SECONDS = 180  # a node finishing an update and a checkpoint on a busy machine


def node_overrides(args: argparse.Namespace) -> list[list[str]]:
    """Per node: seeds that differ (so nodes sample different rollouts), then the user's overrides."""
    extra: list[list[str]] = [[] for _ in range(args.nodes)]
    for item in args.node:
        index, _, assignment = item.partition(":")
        if not index.isdigit() or int(index) >= args.nodes or "=" not in assignment:
            raise ValueError(f"--node {item!r}: expected I:key=value with I in 0..{args.nodes - 1}")
        extra[int(index)].append(assignment)
    # The nodes share this machine's cores: each trainer gets its share (a user's setting wins).
    threads = max(1, len(os.sched_getaffinity(0)) // args.nodes)
    return [[f"train.seed={i}", f"rollout.seed={i}", f"train.cpu_threads={threads}", *args.overrides, *extra[i]]
            for i in range(args.nodes)]


def run_local(args: argparse.Namespace) -> int:
    from rollover.trainer.config import RecipeError, load_recipe

    try:
        per_node = node_overrides(args)
        recipes = [load_recipe(args.recipe, overrides) for overrides in per_node]  # fail before starting
    except (ValueError, RecipeError) as exc:
        print(f"rl-swarm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from rollover.swarm.identity import load_or_create_identity
    from rollover.swarm.records import SwarmError
    from rollover.swarm.transport import SwarmTransport

    out = Path(args.out or f"runs/swarm-{Path(args.recipe).stem}")
    out.mkdir(parents=True, exist_ok=True)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    try:
        transport = SwarmTransport(recipes[0].swarm.name, load_or_create_identity(out / "bootstrap"),
                                   host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                   round_seconds=recipes[0].swarm.round_seconds)
        transport.start()
    except SwarmError as exc:
        print(f"rl-swarm: error: {exc}", file=sys.stderr)
        return 1
    (out / "peers.txt").write_text(" ".join(transport.visible_maddrs()) + "\n")  # for `rl-swarm status`
    nodes = []
    try:
        for i, overrides in enumerate(per_node):
            folder = out / f"node-{i}"
            folder.mkdir(exist_ok=True)
            resume = ["train.resume=true"] if (folder / "checkpoints").is_dir() else []
            command = [sys.executable, "-m", "rollover.swarm.cli", "join", args.recipe,
                       "--peers", *transport.visible_maddrs(), *overrides, f"train.output_dir={folder}",
                       "swarm.host_maddrs=[/ip4/127.0.0.1/tcp/0]", *resume]
            log = (folder / "console.log").open("a")
            # Its own session: a terminal's Ctrl-C reaches us alone, and we stop each node in turn.
            nodes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=_stop_with_parent,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        status = _watch(nodes, out, stopped)
    finally:
        _stop_all(nodes)
        transport.shutdown()
    return status


def _stop_with_parent() -> None:
    """In the node, before exec: SIGINT when `rl-swarm local` dies (even killed), so no node is
    left orphaned; it stops as on Ctrl-C, with a checkpoint. Linux only (prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _watch(nodes: list[subprocess.Popen], out: Path, stopped: threading.Event) -> int:
    """Refresh the table until every node has exited or a stop was asked for."""
    console = Console(stderr=True)
    with Live(_table(nodes, out), console=console, refresh_per_second=1,
              transient=False, auto_refresh=console.is_terminal) as live:
        while not stopped.is_set() and any(p.poll() is None for p in nodes):
            live.update(_table(nodes, out))
            stopped.wait(2.0)
        live.update(_table(nodes, out))
    if stopped.is_set():
        console.print("stopping every node (each saves a checkpoint; run the same command to resume)")
        _stop_all(nodes)
        console.print(_table(nodes, out))
        return 130
    return 0 if all(p.returncode == 0 for p in nodes) else 1


def _stop_all(nodes: list[subprocess.Popen]) -> None:
    """SIGINT to every node still running, then wait; a node stuck past the grace is killed."""
    for process in nodes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in nodes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _table(nodes: list[subprocess.Popen], out: Path) -> Table:
    table = Table(title=f"rl-swarm local: {len(nodes)} nodes in {out}")
    for column in ("node", "state", "step", "reward", "eval acc", "external", "rejected", "peers"):
        table.add_column(column, justify="left" if column in ("node", "state") else "right")
    for i, process in enumerate(nodes):
        last, accuracy = _last_metrics(out / f"node-{i}" / "metrics.jsonl")
        code = process.poll()
        state = "running" if code is None else ("done" if code == 0 else f"exit {code}")
        table.add_row(f"node-{i}", state, _fmt(last.get("step"), "d"), _fmt(last.get("reward"), ".3f"),
                      _fmt(accuracy, ".0%"), _fmt(last.get("swarm/external_groups"), ".0f"),
                      _fmt(last.get("swarm/rejected"), ".0f"), _fmt(last.get("swarm/external_senders"), ".0f"))
    return table


def _last_metrics(path: Path) -> tuple[dict, float | None]:
    """The last training line and the last held-out accuracy of a node's metrics.jsonl."""
    last, accuracy = {}, None
    if not path.is_file():
        return last, accuracy
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "eval/accuracy" in entry:
            accuracy = entry["eval/accuracy"]
        if "reward" in entry:
            last = entry
    return last, accuracy


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(int(value) if spec == "d" else value, spec)
