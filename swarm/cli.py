"""`rl-swarm`: bootstrap a swarm, join one, run one on this machine, or look at one.

    rl-swarm bootstrap [--host-maddrs MADDR ...] [--identity DIR]
    rl-swarm join RECIPE --peers MADDR ... [key=value ...]
    rl-swarm local RECIPE --nodes N [--node I:key=value ...] [key=value ...]
    rl-swarm status --peers MADDR ... [--name NAME]

`join` is `rl-train` with the recipe's `swarm` section switched on; everything a run does
(checkpoints, resume, Ctrl-C, W&B) is the same.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import unicodedata
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rl-swarm", description="SAPO: train beside peers that share rollouts.")
    commands = parser.add_subparsers(dest="command", required=True)
    boot = commands.add_parser("bootstrap", help="a DHT node others join; prints its multiaddrs")
    boot.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"])
    boot.add_argument("--announce-maddrs", nargs="+", default=None)
    boot.add_argument("--identity", default="swarm-bootstrap",
                      help="folder keeping the node's keys, so its peer id survives restarts")
    boot.add_argument("--name", default="rollover", help="the swarm's DHT namespace (swarm.name)")
    boot.add_argument("--round-seconds", type=float, default=None,
                      help="the swarm's swarm.round_seconds (default: serve any whole-second round length)")
    join = commands.add_parser("join", help="train as RECIPE says, sharing rollouts with --peers")
    join.add_argument("recipe")
    join.add_argument("--peers", nargs="+", required=True, help="multiaddrs printed by `rl-swarm bootstrap`")
    join.add_argument("overrides", nargs="*", help="key.sub=value, as for rl-train")
    local = commands.add_parser("local", help="N peers and their bootstrap on this machine, one live table")
    local.add_argument("recipe")
    local.add_argument("--nodes", type=int, required=True)
    local.add_argument("--node", action="append", default=[], metavar="I:key=value",
                       help="an override for node I only (0-based), e.g. 1:model.path=builtin:tiny-math-wide")
    local.add_argument("--out", default=None, help="folder of the node run folders (default runs/swarm-<recipe>)")
    local.add_argument("overrides", nargs="*", help="key.sub=value for every node")
    status = commands.add_parser("status", help="peers seen, records per round, rejections by reason")
    status.add_argument("--peers", nargs="+", required=True)
    status.add_argument("--name", default="rollover")
    status.add_argument("--rounds", type=int, default=4, help="how many recent rounds to read")
    status.add_argument("--round-seconds", type=float, default=None,
                        help="the swarm's swarm.round_seconds (default: the recipe default, 30)")
    # Overrides may come before or after options (`--node 1:k=v a.b=c`): argparse takes only the
    # first run of positionals, so the rest arrive as extras.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra
    if hasattr(args, "overrides") and hasattr(args, "peers"):  # `--peers A B k=v`: no multiaddr has "="
        args.overrides = [p for p in args.peers if "=" in p] + args.overrides
        args.peers = [p for p in args.peers if "=" not in p]
    if args.command == "local" and args.nodes < 1:
        parser.error("--nodes must be at least 1")
    return args


def peers_override(peers: list[str]) -> list[str]:
    """The overrides that make `rl-train` a swarm node joining `peers`."""
    return ["swarm.enabled=true", f"swarm.initial_peers={json.dumps(peers)}"]


def join(args: argparse.Namespace) -> int:
    from rollover.trainer.cli import main as rl_train

    return rl_train([args.recipe, *args.overrides, *peers_override(args.peers)])


def bootstrap(args: argparse.Namespace) -> int:
    """Serve the DHT until SIGINT/SIGTERM; nothing is trained here."""
    from rollover.swarm.identity import load_or_create_identity
    from rollover.swarm.records import SwarmError
    from rollover.swarm.transport import SwarmTransport

    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    try:
        identity = load_or_create_identity(Path(args.identity))
        transport = SwarmTransport(args.name, identity, host_maddrs=args.host_maddrs,
                                   announce_maddrs=args.announce_maddrs,
                                   round_seconds=args.round_seconds)
        transport.start()
    except SwarmError as exc:
        print(f"rl-swarm: error: {exc}", file=sys.stderr)
        return exc.exit_status
    try:
        print("bootstrap peer ready; join with:", flush=True)
        print(f"  rl-swarm join RECIPE --peers {' '.join(transport.visible_maddrs())}", flush=True)
        while not stopped.wait(1.0):
            pass
    finally:
        transport.shutdown()
    return 0


MAX_REASONS_SHOWN = 24
MAX_REASON_CHARS = 40


def printable(text: str, limit: int) -> str:
    """A peer's text made safe for a terminal: control and format characters (escape sequences,
    bidi overrides) dropped, at most `limit` characters."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "CZ" or ch == " ")[:limit]


def rejections_text(status: object) -> str:
    """A peer's status (whatever it holds) as "reason count, ..." for the table, or "-".

    Peers write their statuses: only string reasons with integer counts are shown, cleaned and
    cut, and the caller renders the result as plain text (never as rich markup).
    """
    rejected = status.get("rejected") if isinstance(status, dict) else None
    if not isinstance(rejected, dict):
        return "-"
    shown = []
    for reason, count in rejected.items():
        if isinstance(reason, str) and isinstance(count, int) and not isinstance(count, bool):
            reason = printable(reason, MAX_REASON_CHARS)
            if reason:
                shown.append(f"{reason} {count}")
    shown.sort()
    extra = f", ... {len(shown) - MAX_REASONS_SHOWN} more" if len(shown) > MAX_REASONS_SHOWN else ""
    return ", ".join(shown[:MAX_REASONS_SHOWN]) + extra if shown else "-"


def status(args: argparse.Namespace) -> int:
    """Read the swarm's recent rounds as a client (it stores nothing)."""
    import time

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from rollover.swarm.records import SwarmError, round_at
    from rollover.swarm.transport import SwarmTransport
    from rollover.swarm.config import SwarmConfig

    round_seconds = args.round_seconds or SwarmConfig().round_seconds
    try:
        transport = SwarmTransport(args.name, None, initial_peers=args.peers, client_mode=True,
                                   round_seconds=round_seconds)
        transport.start()
    except SwarmError as exc:
        print(f"rl-swarm: error: {exc}", file=sys.stderr)
        return exc.exit_status
    try:
        now = round_at(time.time(), round_seconds)
        rounds = list(range(now - args.rounds + 1, now + 1))
        records = {r: transport.collect(r) for r in rounds}
        statuses = transport.read_status(rounds)
    finally:
        transport.shutdown()
    table = Table(title=f"swarm '{args.name}': rounds {rounds[0]}..{rounds[-1]} ({round_seconds:g} s each)")
    table.add_column("peer")
    for r in rounds:
        table.add_column(f"r{r}", justify="right")
    table.add_column("rejected (by reason)")
    senders = sorted({item.sender for items in records.values() for item in items} | set(statuses))
    for sender in senders:
        counts = [str(sum(item.sender == sender for item in records[r])) for r in rounds]
        table.add_row(sender, *counts, Text(rejections_text(statuses.get(sender))))
    console = Console()
    console.print(table if senders else f"no peer has published in rounds {rounds[0]}..{rounds[-1]}")
    console.print(f"{len(senders)} peers seen")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "join":
        return join(args)
    if args.command == "bootstrap":
        return bootstrap(args)
    if args.command == "status":
        return status(args)
    from rollover.swarm.local import run_local

    return run_local(args)


if __name__ == "__main__":
    sys.exit(main())
