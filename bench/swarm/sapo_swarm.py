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

Metric (the paper's, made honest): cumulative reward of the completions each node generated
itself, over every scored sample, the filtered ones included (`rollout/reward_before_filter`,
summed over steps) — not the training batch's reward, which favours the external groups that
survived the filter. Beside it: held-out greedy accuracy at the start and the end, per node.

    python -m bench.swarm.sapo_swarm [--nodes 4] [--steps 40] [--configs 8/0,6/2,4/4,2/6,filter]
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
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine, save_json, spread

RECIPE = "recipes/grpo_math.yaml"
FILTER = "filter"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--configs", default="8/0,6/2,4/4,2/6,filter", help="comma-separated I/J pairs and 'filter'")
    p.add_argument("--reps", type=int, default=1, help="swarms per configuration (seeds differ per rep)")
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--round-seconds", type=float, default=8.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override for every node")
    p.add_argument("--run-timeout", type=float, default=2400.0, help="seconds before a swarm is stopped")
    p.add_argument("--out", type=Path, default=RESULTS / "sapo_swarm.json")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out and exit")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for config in args.configs:
        if config != FILTER:
            local, _, external = config.partition("/")
            if not (local.isdigit() and external.isdigit() and int(local) > 0):
                p.error(f"--configs: {config!r} is neither I/J (I >= 1) nor '{FILTER}'")
    return args


def config_overrides(config: str) -> list[str]:
    """What makes a configuration: I local groups, J external, and whether local groups are filtered."""
    if config == FILTER:
        return ["rollout.groups_per_step=8", "swarm.external_groups=0", "algo.dynamic_sampling=true"]
    local, external = config.split("/")
    return [f"rollout.groups_per_step={local}", f"swarm.external_groups={external}", "algo.dynamic_sampling=false"]


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
    """One node's run: per-step local reward and its cumulative sum, accuracy at start and end."""
    steps = [r for r in rows if "rollout/reward_before_filter" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    local = [r["rollout/reward_before_filter"] for r in steps]
    cumulative, total = [], 0.0
    for value in local:
        total += value
        cumulative.append(round(total, 4))
    mean = lambda key: statistics.fmean([r.get(key, 0.0) for r in steps]) if steps else None  # noqa: E731
    return {
        "steps": len(steps),
        "cumulative_local_reward": cumulative[-1] if cumulative else 0.0,
        "cumulative_curve": cumulative,
        "local_reward_per_step": [round(v, 4) for v in local],
        "initial_accuracy": evals[0]["eval/accuracy"] if evals else None,
        "final_accuracy": evals[-1]["eval/accuracy"] if len(evals) > 1 else None,
        "external_share": mean("swarm/external_share"),
        "external_groups_used": sum(r.get("swarm/external_groups", 0.0) for r in steps),
        "rejected": steps[-1].get("swarm/rejected", 0.0) if steps else 0.0,
        "train_seconds": sum(r.get("time/step", 0.0) for r in steps),
        "max_swarm_wait_s": max((r.get("time/swarm", 0.0) for r in steps), default=None),
    }


def run_swarm(config: str, rep: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One `rl-swarm local` of this configuration; the figures of each node."""
    seeds = [f"{i}:train.seed={rep * args.nodes + i}" for i in range(args.nodes)] + \
            [f"{i}:rollout.seed={rep * args.nodes + i}" for i in range(args.nodes)]
    tag = config.replace("/", "-")
    command = [sys.executable, "-m", "rollover.swarm.cli", "local", RECIPE, "--nodes", str(args.nodes),
               "--out", str(folder), *[x for s in seeds for x in ("--node", s)],
               f"train.steps={args.steps}", f"train.eval_every={max(1, args.steps // 2)}",
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
    nodes = [node_figures(read_metrics(folder / f"node-{i}" / "metrics.jsonl")) for i in range(args.nodes)]
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
        summary[config] = {
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
        }
    for reference in ("8/0", FILTER):
        base = (summary.get(reference, {}).get("cumulative_local_reward_sum") or {}).get("median")
        for config, entry in summary.items():
            value = (entry["cumulative_local_reward_sum"] or {}).get("median")
            entry[f"gain_vs_{reference.replace('/', '_')}"] = (
                round(value / base - 1.0, 4) if base and value is not None else None)
    return summary


def plot(result: dict[str, Any], out: Path) -> None:
    """Cumulative local reward per step (mean over nodes, each swarm) and final accuracy per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    palette = plt.get_cmap("tab10").colors
    for i, config in enumerate(result["config"]["configs"]):
        colour = palette[i % len(palette)]
        for run in (r for r in result["runs"] if r["config"] == config and r["ok"]):
            for node in run["nodes"]:
                left.plot(range(1, len(node["cumulative_curve"]) + 1), node["cumulative_curve"],
                          color=colour, linewidth=0.7, alpha=0.35)
            curves = [n["cumulative_curve"] for n in run["nodes"]]
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[s] for c in curves) for s in range(length)]
            left.plot(range(1, length + 1), mean, color=colour, linewidth=2.2,
                      label=config if run["rep"] == 0 else None)
        finals = [n["final_accuracy"] for r in result["runs"] if r["config"] == config and r["ok"]
                  for n in r["nodes"] if n["final_accuracy"] is not None]
        right.scatter([i] * len(finals), finals, color=colour, alpha=0.6)
        if finals:
            right.plot([i - 0.25, i + 0.25], [statistics.median(finals)] * 2, color=colour, linewidth=2.5)
    starts = [n["initial_accuracy"] for r in result["runs"] if r["ok"] for n in r["nodes"]
              if n["initial_accuracy"] is not None]
    if starts:
        right.axhline(statistics.median(starts), linestyle="--", color="grey", label="start (median)")
    nodes, steps = result["config"]["nodes"], result["config"]["steps"]
    left.set_title(f"cumulative reward of each node's own completions ({nodes} nodes; bold: node mean)", fontsize=9)
    left.set_xlabel("step")
    left.set_ylabel("sum over steps of mean local reward")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xticks(range(len(result["config"]["configs"])), result["config"]["configs"])
    right.set_title(f"held-out greedy accuracy after {steps} steps, per node (bar: median)", fontsize=9)
    right.set_ylabel("accuracy")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"SAPO swarm on one machine - {result['machine']['cpu']}, {result['machine']['cores']} cores",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def print_table(result: dict[str, Any]) -> None:
    fmt = lambda s, d=2: "-" if not s or s["median"] is None else f"{s['median']:.{d}f} ({s['min']:.{d}f}-{s['max']:.{d}f})"  # noqa: E731
    print(f"\n{'config':8s} {'cum. local reward, swarm sum':>30s} {'per node':>24s} {'vs 8/0':>8s} "
          f"{'vs filter':>9s} {'final acc per node':>22s} {'s/step':>18s}")
    for config, s in result["summary"].items():
        gain = lambda key: "-" if s[key] is None else f"{s[key]:+.1%}"  # noqa: E731
        print(f"{config:8s} {fmt(s['cumulative_local_reward_sum']):>30s} "
              f"{fmt(s['cumulative_local_reward_per_node']):>24s} {gain('gain_vs_8_0'):>8s} "
              f"{gain('gain_vs_filter'):>9s} {fmt(s['final_accuracy_per_node'], 3):>22s} "
              f"{fmt(s['seconds_per_step']):>18s}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    png = args.out.with_suffix(".png")
    if args.plot_only:
        result = json.loads(args.out.read_text())
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
