"""SAPO on one machine: does sharing rollouts help, and is it the sharing or the filtering?

Each configuration is one real `rl-swarm local` swarm of N nodes (a bootstrap peer, N training
processes with their own vLLM engines and seeds, the hivemind DHT on loopback), all nodes
running at once, the configurations one after another:

  I/J  (8/0, 6/2, 4/4, 2/6)  each node trains on I groups it generated and J groups drawn from its
                             peers' (which the receiver re-scores and keeps only when their rewards
                             differ: zero-advantage groups teach nothing); its own groups are not
                             filtered (algo.dynamic_sampling=false), as in the SAPO paper.
  filter                     no sharing (J=0), and each node filters its own groups the way peers'
                             are filtered: APRIL draws 2x the groups and dynamic sampling drops
                             the zero-advantage ones. SAPO's gain at I/J mixes sharing with this
                             filtering; this ablation gives filtering alone.
  mixed-I/J                  a heterogeneous swarm: the first half of the nodes run tiny-math
                             sampling cold (temperature 0.5), the second half run
                             tiny-math-wide (another width and vocabulary: text crosses, token ids
                             do not) at the recipe's temperature. mixed-8/0 is each of them alone.

Metric (the paper's, made honest): cumulative reward of the completions each node generated
itself, over every scored sample, the filtered ones included (`rollout/reward_before_filter`,
summed over steps) — not the training batch's reward, which favours the external groups that
survived the filter. Beside it: held-out greedy accuracy per node over steps, and against the
tokens the node generated itself (`rollout/generated_tokens`: every token its engine streamed,
aborted, dropped and filtered ones included), since what a peer saves a node is generation.

    python -m bench.swarm.sapo_swarm [--nodes 4] [--steps 40] [--reps 2] [--configs 8/0,4/4,filter,mixed-8/0,mixed-4/4]
    python -m bench.swarm.sapo_swarm --plot-only   # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine, save_json, spread
from bench.swarm.sapo_report import plot, print_table

RECIPE = "recipes/grpo_math.yaml"
FILTER = "filter"
RESCORED = "wrong_steps"  # a rejection reason that counts completions, not groups
MIXED = "mixed-"  # prefix of a heterogeneous I/J configuration
COLD_TEMPERATURE = 0.5  # the mixed swarm's first half samples this cold
OTHER_MODEL = "builtin:tiny-math-wide"  # and its second half runs this model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--configs", default="8/0,4/4,filter,mixed-8/0,mixed-4/4",
                   help="comma-separated I/J pairs, mixed-I/J (a heterogeneous swarm) and 'filter'")
    p.add_argument("--reps", type=int, default=2, help="swarms per configuration (seeds differ per rep)")
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--evals", type=int, default=4, help="held-out evaluations after the start (every steps/evals)")
    p.add_argument("--round-seconds", type=float, default=8.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override for every node")
    p.add_argument("--run-timeout", type=float, default=2400.0, help="seconds before a swarm is stopped")
    p.add_argument("--out", type=Path, default=RESULTS / "sapo_swarm.json")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out and exit")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for config in args.configs:
        if config != FILTER:
            local, _, external = config.removeprefix(MIXED).partition("/")
            if not (local.isdigit() and external.isdigit() and int(local) > 0):
                p.error(f"--configs: {config!r} is neither I/J, {MIXED}I/J (I >= 1) nor '{FILTER}'")
    if any(c.startswith(MIXED) for c in args.configs) and args.nodes < 2:
        p.error("--configs: a mixed swarm needs --nodes 2 or more")
    return args


def config_overrides(config: str) -> list[str]:
    """What makes a configuration: I local groups, J external, and whether local groups are filtered."""
    if config == FILTER:
        return ["rollout.groups_per_step=8", "swarm.external_groups=0", "algo.dynamic_sampling=true"]
    local, external = config.removeprefix(MIXED).split("/")
    return [f"rollout.groups_per_step={local}", f"swarm.external_groups={external}", "algo.dynamic_sampling=false"]


ROLE_SETTINGS = {  # what makes each kind of node (`--node i:key=value`), by the name tables use
    "tiny-math": None,
    f"tiny-math T={COLD_TEMPERATURE}": f"rollout.temperature={COLD_TEMPERATURE}",
    "tiny-math-wide": f"model.path={OTHER_MODEL}",
}


def node_role(config: str, index: int, nodes: int) -> str:
    """What a node is in its swarm: every node is alike unless the swarm is mixed, where the first
    half samples cold and the second half runs the other model."""
    if not config.startswith(MIXED):
        return "tiny-math"
    return f"tiny-math T={COLD_TEMPERATURE}" if index < nodes // 2 else "tiny-math-wide"


def node_overrides(config: str, nodes: int) -> list[str]:
    """Per-node settings (`--node i:key=value`) that give each node its role."""
    roles = [ROLE_SETTINGS[node_role(config, i, nodes)] for i in range(nodes)]
    return [f"{i}:{setting}" for i, setting in enumerate(roles) if setting is not None]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """A node's metrics.jsonl (a half-written last line is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def node_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One node's run: per-step local reward and its cumulative sum; held-out accuracy at each
    evaluation, with the tokens the node had generated itself by then; accuracy gained per
    million own tokens."""
    steps = [r for r in rows if "rollout/reward_before_filter" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    local = [r["rollout/reward_before_filter"] for r in steps]
    cumulative, total = [], 0.0
    for value in local:
        total += value
        cumulative.append(round(total, 4))
    tokens_by_step, tokens = {0: 0}, 0
    for r in steps:
        tokens += int(r.get("rollout/generated_tokens", 0))
        tokens_by_step[r["step"]] = tokens
    accuracy_curve = [{"step": r["step"], "own_tokens": tokens_by_step.get(r["step"]),
                       "accuracy": r["eval/accuracy"]} for r in evals]
    gained = evals[-1]["eval/accuracy"] - evals[0]["eval/accuracy"] if len(evals) > 1 else None
    mean = lambda key: statistics.fmean([r.get(key, 0.0) for r in steps]) if steps else None  # noqa: E731
    return {
        "steps": len(steps),
        "cumulative_local_reward": cumulative[-1] if cumulative else 0.0,
        "cumulative_curve": cumulative,
        "local_reward_per_step": [round(v, 4) for v in local],
        "initial_accuracy": evals[0]["eval/accuracy"] if evals else None,
        "final_accuracy": evals[-1]["eval/accuracy"] if len(evals) > 1 else None,
        "accuracy_curve": accuracy_curve,
        "own_tokens": tokens,
        "accuracy_gain_per_m_own_tokens": round(gained / tokens * 1e6, 4) if gained is not None and tokens else None,
        "external_share": mean("swarm/external_share"),
        "external_groups_used": sum(r.get("swarm/external_groups", 0.0) for r in steps),
        "received": steps[-1].get("swarm/received", 0.0) if steps else 0.0,
        "rejected": steps[-1].get("swarm/rejected", 0.0) if steps else 0.0,
        "rejected_by_reason": {k.removeprefix("swarm/rejected/"): v for k, v in (steps[-1] if steps else {}).items()
                               if k.startswith("swarm/rejected/")},
        "train_seconds": sum(r.get("time/step", 0.0) for r in steps),
        "wall_seconds": round(sum(r.get("time/step", 0.0) + r.get("time/eval", 0.0) for r in rows), 1),
        "max_swarm_wait_s": max((r.get("time/swarm", 0.0) for r in steps), default=None),
    }


def run_swarm(config: str, rep: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One `rl-swarm local` of this configuration; the figures of each node."""
    seeds = [f"{i}:train.seed={rep * args.nodes + i}" for i in range(args.nodes)] + \
            [f"{i}:rollout.seed={rep * args.nodes + i}" for i in range(args.nodes)]
    tag = config.replace("/", "-")
    command = [sys.executable, "-m", "rollover.swarm.cli", "local", RECIPE, "--nodes", str(args.nodes),
               "--out", str(folder), *[x for s in seeds + node_overrides(config, args.nodes) for x in ("--node", s)],
               f"train.steps={args.steps}", f"train.eval_every={max(1, args.steps // args.evals)}",
               f"train.save_every={10 * args.steps}", f"task.eval_size={args.eval_size}",
               "tracking.wandb=disabled", "rollout.kv_cache_gib=0.5",
               f"swarm.round_seconds={args.round_seconds}", f"swarm.name=sapo-bench-{tag}-{rep}",
               *config_overrides(config), *args.set]
    started = time.monotonic()
    log = (folder.parent / f"{folder.name}.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "160"})
    try:
        returncode = process.wait(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # every node saves and stops
        returncode = process.wait()
    wall = time.monotonic() - started
    nodes = [{"role": node_role(config, i, args.nodes), **node_figures(read_metrics(folder / f"node-{i}" / "metrics.jsonl"))}
             for i in range(args.nodes)]
    ok = returncode == 0 and all(n["steps"] == args.steps for n in nodes)
    error = None if ok else (folder.parent / f"{folder.name}.log").read_text()[-2000:]
    return {"config": config, "rep": rep, "ok": ok, "returncode": returncode, "wall_seconds": round(wall, 1),
            "load_average_end": os.getloadavg(), "command": command[2:], "nodes": nodes, "error": error}


def summarize(runs: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    """Per configuration: swarm totals (summed over nodes) and per-node spreads; ratios to 8/0 and filter."""
    summary: dict[str, Any] = {}
    for config in configs:
        done = [r for r in runs if r["config"] == config and r["ok"]]
        per_node = [n for r in done for n in r["nodes"]]
        finals = [n["final_accuracy"] for n in per_node if n["final_accuracy"] is not None]
        received, refused = sum(n.get("received", 0.0) for n in per_node), Counter()
        for n in per_node:
            refused.update(n.get("rejected_by_reason", {}))
        # wrong_steps counts completions re-scored wrong (their group is still trained), not groups
        rescored = refused.pop(RESCORED, 0.0)
        summary[config] = {
            "received": received,
            "refused_share_of_received": {reason: round(count / received, 4) for reason, count in refused.items()}
            if received else {},
            "completions_rescored_wrong_per_received_group": round(rescored / received, 4) if received else None,
            "swarms": len(done),
            "cumulative_local_reward_sum": spread([sum(n["cumulative_local_reward"] for n in r["nodes"])
                                                   for r in done]),
            "cumulative_local_reward_per_node": spread([n["cumulative_local_reward"] for n in per_node]),
            "final_accuracy_per_node": spread(finals),
            "final_accuracy_sum": spread([sum(n["final_accuracy"] or 0.0 for n in r["nodes"]) for r in done]),
            "initial_accuracy_per_node": spread([n["initial_accuracy"] for n in per_node
                                                 if n["initial_accuracy"] is not None]),
            "external_share": spread([n["external_share"] for n in per_node if n["external_share"] is not None]),
            "seconds_per_step": spread([n["train_seconds"] / n["steps"] for n in per_node if n["steps"]]),
            "max_swarm_wait_s": max((n["max_swarm_wait_s"] or 0.0 for n in per_node), default=None),
            "by_role": {role: role_figures([n for n in per_node if n.get("role", "tiny-math") == role])
                        for role in dict.fromkeys(n.get("role", "tiny-math") for n in per_node)},
        }
    for config, entry in summary.items():  # learning per own token against the same nodes alone
        alone = summary.get(f"{MIXED}8/0" if config.startswith(MIXED) else "8/0", {}).get("by_role", {})
        for role, figures in entry["by_role"].items():
            base = (alone.get(role, {}).get("accuracy_gain_per_m_own_tokens") or {}).get("median")
            value = figures["accuracy_gain_per_m_own_tokens"]["median"]
            figures["gain_per_token_vs_alone"] = round(value / base, 3) if base and base > 0 and value is not None else None
    for reference in ("8/0", FILTER):
        base = (summary.get(reference, {}).get("cumulative_local_reward_sum") or {}).get("median")
        for config, entry in summary.items():
            value = (entry["cumulative_local_reward_sum"] or {}).get("median")
            entry[f"gain_vs_{reference.replace('/', '_')}"] = (
                round(value / base - 1.0, 4) if base and value is not None else None)
    return summary


def role_figures(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """One kind of node across the swarms of a configuration: what it generated, what it learned."""
    gained = [n["final_accuracy"] - n["initial_accuracy"] for n in nodes
              if n["final_accuracy"] is not None and n["initial_accuracy"] is not None]
    return {
        "nodes": len(nodes),
        "own_tokens": spread([n["own_tokens"] for n in nodes if "own_tokens" in n]),
        "accuracy_gained": spread(gained),
        "accuracy_gain_per_m_own_tokens": spread([n["accuracy_gain_per_m_own_tokens"] for n in nodes
                                                  if n.get("accuracy_gain_per_m_own_tokens") is not None]),
        "final_accuracy": spread([n["final_accuracy"] for n in nodes if n["final_accuracy"] is not None]),
        "external_share": spread([n["external_share"] for n in nodes if n["external_share"] is not None]),
        "wall_seconds": spread([n["wall_seconds"] for n in nodes if "wall_seconds" in n]),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    png = args.out.with_suffix(".png")
    if args.plot_only:
        result = json.loads(args.out.read_text())
        result["summary"] = summarize(result["runs"], result["config"]["configs"])  # from the runs, as now counted
        print_table(result)
        plot(result, png)
        return
    result = {"benchmark": "SAPO swarm: I local + J external groups per step vs filtering only",
              "machine": machine(), "load_average_start": os.getloadavg(),
              "config": {"nodes": args.nodes, "steps": args.steps, "configs": args.configs, "reps": args.reps,
                         "eval_size": args.eval_size, "round_seconds": args.round_seconds, "recipe": RECIPE,
                         "set": args.set, "metric": "sum over steps of rollout/reward_before_filter"},
              "runs": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sapo-bench-") as scratch:
        for rep in range(args.reps):
            for config in args.configs:
                print(f"{config} rep {rep}: {args.nodes} nodes, {args.steps} steps", file=sys.stderr, flush=True)
                run = run_swarm(config, rep, args, Path(scratch) / f"{config.replace('/', '-')}-{rep}")
                result["runs"].append(run)
                sums = [round(n["cumulative_local_reward"], 2) for n in run["nodes"]]
                print(f"  {'ok' if run['ok'] else 'FAILED'} in {run['wall_seconds']:.0f} s; cumulative local "
                      f"reward per node {sums}; final accuracy {[n['final_accuracy'] for n in run['nodes']]}",
                      file=sys.stderr, flush=True)
                result["summary"] = summarize(result["runs"], args.configs)
                result["bench_wall_seconds"] = round(time.monotonic() - started, 1)
                save_json(result, args.out)
    result["load_average_end"] = os.getloadavg()
    save_json(result, args.out)
    print_table(result)
    plot(result, png)


if __name__ == "__main__":
    main()
