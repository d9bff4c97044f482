"""The simulator's figures: one run's totals, the sweep's table and ratios, merged parts."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def summarize_run(records: list[dict[str, Any]]) -> dict[str, Any]:
    tot = {k: sum(r[k] for r in records) for k in ("useful_tokens", "generated_tokens", "stale_tokens",
                                                   "unfinished_tokens", "filtered_tokens",
                                                   "rollout_s", "train_s", "sync_s", "step_s")}
    wasted = tot["stale_tokens"] + tot["unfinished_tokens"] + tot["filtered_tokens"]
    ratios = [r["queue_max"] / r["queue_mean"] for r in records if r["queue_mean"] > 0]
    return {
        "totals": tot,
        "useful_tokens_per_s": tot["useful_tokens"] / tot["step_s"],
        "useful_tokens_per_s_rollout": tot["useful_tokens"] / tot["rollout_s"],
        "waste_fraction": wasted / tot["generated_tokens"] if tot["generated_tokens"] else 0.0,
        "rollout_s_per_step": tot["rollout_s"] / len(records),
        "seconds_per_step": tot["step_s"] / len(records),
        "engine_busy_mean": statistics.mean(r["busy_mean"] for r in records),
        "engine_busy_min": min(r["busy_min"] for r in records),
        "queue_mean": statistics.mean(r["queue_mean"] for r in records),
        "queue_max": max(r["queue_max"] for r in records),
        "queue_max_over_mean": statistics.mean(ratios) if ratios else None,
        "queue_slow_mean": (statistics.mean(r["queue_slow_mean"] for r in records)
                            if records[0]["queue_slow_mean"] is not None else None),
        "migrations": sum(r["migrations"] for r in records),
        "groups_moved_per_step": statistics.mean(r["groups_moved"] for r in records),
        "groups_resumed_per_step": statistics.mean(r["groups_resumed"] for r in records),
        "buffered_tokens_end": records[-1]["buffered_tokens"],
        "rollout_real_s_per_step": statistics.mean(r["rollout_real_s"] for r in records),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput ratios per engine setting and count, and the 64-engine headline."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r.get("death_run"):
            continue
        key = ("hetero" if r["hetero"] else "homogeneous") + (f"/{r['variant']}" if r.get("variant") else "")
        table.setdefault(key, {}).setdefault(str(r["engines"]), {})[r["mode"]] = {
            **{k: r[k] for k in ("useful_tokens_per_s", "useful_tokens_per_s_rollout", "waste_fraction",
                                 "rollout_s_per_step", "seconds_per_step", "engine_busy_mean", "queue_mean",
                                 "queue_max", "queue_max_over_mean", "queue_slow_mean",
                                 "rollout_real_s_per_step", "groups_moved_per_step",
                                 "groups_resumed_per_step")},
            "queue_slow_over_mean": (r["queue_slow_mean"] / r["queue_mean"]
                                     if r["queue_slow_mean"] is not None and r["queue_mean"] else None)}
    out: dict[str, Any] = {"table": table, "ratios": {}}
    for key, by_engines in table.items():
        for engines, modes in by_engines.items():
            rate = {m: v["useful_tokens_per_s"] for m, v in modes.items()}
            ratios = {}
            base_sync = table.get(key.split("/")[0], {}).get(engines, {}).get("sync")
            if "sync" not in rate and base_sync is not None:  # a variant without its own sync run
                rate["sync"] = base_sync["useful_tokens_per_s"]
                ratios["sync_from"] = key.split("/")[0]
            if "sync" in rate:
                ratios.update({f"{m}_over_sync": rate[m] / rate["sync"] for m in rate if m != "sync"})
            if "april" in rate and "april_sticky" in rate:
                ratios["april_over_april_sticky"] = rate["april"] / rate["april_sticky"]
            out["ratios"].setdefault(key, {})[engines] = ratios
    for key in out["ratios"]:
        if "64" in out["ratios"][key]:
            out[f"headline_64_engines_{key}"] = out["ratios"][key]["64"]
    return out


def merge(paths: list[Path]) -> dict[str, Any]:
    """One result from the results of several invocations (a sweep run in parts)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    result = dict(parts[0])
    result["runs"] = [r for part in parts for r in part["runs"]]
    for r in result["runs"]:  # the figures again from the step records (this code's definitions)
        for key in ("useful_tokens", "generated_tokens", "stale_tokens", "unfinished_tokens",
                    "filtered_tokens", "rollout_s", "train_s", "sync_s", "step_s"):
            r.pop(key, None)
        r.update(summarize_run([s for s in r["steps"] if not s["warmup"]]))
    result["summary"] = summary(result["runs"])
    result["parts"] = [{"config": p["config"], "sim_wall_s": p["sim_wall_s"], "machine": p["machine"]}
                       for p in parts]
    result["sim_wall_s"] = sum(p["sim_wall_s"] for p in parts)
    for part in parts:
        if "validation_one_engine" in part:
            result["validation_one_engine"] = part["validation_one_engine"]
    return result
