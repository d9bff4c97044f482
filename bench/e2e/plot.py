"""Plot `bench/e2e/e2e_vs_trl.py`'s results: held-out accuracy against training seconds, per workload.

One panel per workload; each system in its own colour (the same in every panel), each seed a
thin line, the median curve over seeds bold (per evaluated step: median seconds, median
accuracy), a marker on the target line at the system's median time to target, and the target
as a dashed horizontal line.

    python -m bench.e2e.plot [--in bench/results/e2e_vs_trl.json] [--out FILE.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS
from bench.e2e.e2e_lib import median_curve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="source", type=Path, default=RESULTS / "e2e_vs_trl.json")
    p.add_argument("--out", type=Path, default=None, help="default: the input's name with .png")
    args = p.parse_args(argv)
    args.out = args.out or args.source.with_suffix(".png")
    return args


def selected_runs(result: dict[str, Any], entry: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The successful runs of the benchmark's configured seeds, per system of the workload's summary."""
    seeds = {str(s) for s in result["config"]["seeds"]}
    return {system: [run for seed, run in entry["runs"].get(system, {}).items() if seed in seeds and run.get("ok")]
            for system in entry.get("systems", {})}


def speedup_text(entry: dict[str, Any]) -> str:
    """'2.5x (TRL / april)' or why there is none."""
    if entry.get("speedup_to_target") is None:
        bound = entry.get("speedup_to_target_at_least")
        return entry.get("speedup_note", "n/a") + (f"; >= {bound}x ({entry['speedup_best_system']})" if bound else "")
    return f"{entry['speedup_to_target']}x (TRL / {entry['speedup_best_system']})"


def plot_workload(ax, name: str, result: dict[str, Any], colours: dict[str, str]) -> None:
    """One panel: every seed thin, the median bold, the target dashed, median times to target marked."""
    entry = result["workloads"][name]
    target = entry["target"]["accuracy"]
    for system, runs in selected_runs(result, entry).items():
        colour, summary = colours[system], entry["systems"][system]
        for run in runs:
            ax.plot([p["train_seconds"] for p in run["curve"]], [p["accuracy"] for p in run["curve"]],
                    color=colour, linewidth=0.8, alpha=0.35)
        label = f"{system} ({len(runs)}/{summary['runs']} runs)"
        if not runs:
            ax.plot([], [], color=colour, label=label + " - failed")
            continue
        median = median_curve([run["curve"] for run in runs])
        ax.plot([p["train_seconds"] for p in median], [p["accuracy"] for p in median],
                color=colour, linewidth=2.4, label=label)
        reached = (summary.get("seconds_to_target") or {}).get("median")
        if target is not None and reached is not None:
            ax.plot([reached], [target], marker="o", markersize=8, color=colour,
                    markeredgecolor="black", zorder=5)
    if target is not None:
        ax.axhline(target, linestyle="--", color="grey", linewidth=1.2,
                   label=f"target {target:.1%} ({entry['target']['fraction']:g} of the best gain)")
    settings = entry.get("settings", {})
    ax.set_title(f"{name}: {settings.get('model', '?')}, {settings.get('groups_per_step', '?')}x"
                 f"{settings.get('group_size', '?')} per step, {settings.get('steps', '?')} steps\n"
                 f"speedup to target: {speedup_text(entry)}", fontsize=9)
    ax.set_xlabel("training seconds (rollout + update + weight sync; no eval, no start-up)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(args.source.read_text())
    if "workloads" not in result:
        raise SystemExit(f"{args.source}: not in bench/e2e/e2e_vs_trl.py's per-workload layout (an older run?)")
    names = [n for n, e in result["workloads"].items() if e.get("systems") and e.get("target")]
    if not names:
        raise SystemExit(f"{args.source}: no workload with runs to plot")
    systems = list(dict.fromkeys(s for n in names for s in result["workloads"][n]["systems"]))
    palette = plt.get_cmap("tab10").colors
    colours = {system: palette[i % len(palette)] for i, system in enumerate(systems)}
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        plot_workload(ax, name, result, colours)
    fig.suptitle(f"{result['benchmark']} - {result['machine']['cpu']}, {result['machine']['cores']} cores",
                 fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
