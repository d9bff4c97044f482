"""The SAPO benchmark's figure and table, drawn from its JSON (`sapo_swarm --plot-only` redraws them)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def role_curves(result: dict[str, Any], config: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per kind of node in a configuration: mean own tokens and mean held-out accuracy at each
    evaluation, over its nodes in every swarm (evaluations matched by index)."""
    by_role: dict[str, list[list[dict[str, Any]]]] = {}
    for run in (r for r in result["runs"] if r["config"] == config and r["ok"]):
        for node in run["nodes"]:
            if node.get("accuracy_curve"):
                by_role.setdefault(node.get("role", "tiny-math"), []).append(node["accuracy_curve"])
    curves = {}
    for role, node_curves in by_role.items():
        length = min(len(c) for c in node_curves)
        curves[role] = ([statistics.fmean(c[i]["own_tokens"] or 0 for c in node_curves) for i in range(length)],
                        [statistics.fmean(c[i]["accuracy"] for c in node_curves) for i in range(length)])
    return curves


def plot(result: dict[str, Any], out: Path) -> None:
    """Cumulative local reward per step; held-out accuracy against each node's own generated
    tokens; final accuracy per node and configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5))
    palette = plt.get_cmap("tab10").colors
    configs = result["config"]["configs"]
    for i, config in enumerate(configs):
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
        for k, (role, (tokens, accuracy)) in enumerate(role_curves(result, config).items()):
            middle.plot([t / 1e6 for t in tokens], accuracy, color=colour, marker="o", markersize=3,
                        linestyle="-" if k == 0 else "--", label=f"{config}: {role}")
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
    swarms = result["config"].get("reps", 1)
    left.set_title(f"cumulative reward of each node's own completions ({nodes} nodes; bold: node mean)", fontsize=9)
    left.set_xlabel("step")
    left.set_ylabel("sum over steps of mean local reward")
    middle.set_title(f"held-out accuracy against the tokens a node generated itself (mean of its kind, "
                     f"{swarms} swarm(s))", fontsize=9)
    middle.set_xlabel("own generated tokens (millions)")
    middle.set_ylabel("accuracy")
    right.set_xticks(range(len(configs)), configs, fontsize=8)
    right.set_title(f"held-out greedy accuracy after {steps} steps, per node (bar: median)", fontsize=9)
    right.set_ylabel("accuracy")
    for axes in (left, middle, right):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    fig.suptitle(f"SAPO swarm on one machine - {result['machine']['cpu']}, {result['machine']['cores']} cores",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def print_table(result: dict[str, Any]) -> None:
    """Per configuration: local reward and accuracy; then per kind of node: learning per own token."""
    fmt = lambda s, d=2: "-" if not s or s["median"] is None else f"{s['median']:.{d}f} ({s['min']:.{d}f}-{s['max']:.{d}f})"  # noqa: E731
    print(f"\n{'config':10s} {'cum. local reward, swarm sum':>30s} {'per node':>24s} {'vs 8/0':>8s} "
          f"{'vs filter':>9s} {'final acc per node':>22s} {'s/step':>18s}")
    for config, s in result["summary"].items():
        gain = lambda key: "-" if s[key] is None else f"{s[key]:+.1%}"  # noqa: E731
        print(f"{config:10s} {fmt(s['cumulative_local_reward_sum']):>30s} "
              f"{fmt(s['cumulative_local_reward_per_node']):>24s} {gain('gain_vs_8_0'):>8s} "
              f"{gain('gain_vs_filter'):>9s} {fmt(s['final_accuracy_per_node'], 3):>22s} "
              f"{fmt(s['seconds_per_step']):>18s}")
    print(f"\n{'config':10s} {'node':22s} {'own tokens (k)':>22s} {'accuracy gained':>24s} "
          f"{'gain per M own tokens':>26s} {'vs alone':>8s} {'peer share':>18s}")
    for config, s in result["summary"].items():
        for role, r in s.get("by_role", {}).items():
            tokens = r["own_tokens"]
            thousands = {k: (v / 1e3 if isinstance(v, (int, float)) and k != "n" else v) for k, v in tokens.items()}
            ratio = "-" if r.get("gain_per_token_vs_alone") is None else f"{r['gain_per_token_vs_alone']:.2f}x"
            print(f"{config:10s} {role:22s} {fmt(thousands, 0):>22s} {fmt(r['accuracy_gained'], 3):>24s} "
                  f"{fmt(r['accuracy_gain_per_m_own_tokens'], 3):>26s} {ratio:>8s} {fmt(r['external_share']):>18s}")
    print("\nrefused, share of the groups received (all peers honest):")
    for config, s in result["summary"].items():
        shares = ", ".join(f"{reason} {share:.1%}" for reason, share in sorted(s.get("refused_share_of_received", {}).items()))
        rescored = s.get("completions_rescored_wrong_per_received_group")
        print(f"{config:10s} {s.get('received', 0):.0f} received; {shares or '-'}"
              + ("" if rescored is None else f"; {rescored:.2f} completions re-scored wrong per group"))
