"""Pure helpers of `bench/e2e/e2e_vs_trl.py` and `bench/e2e/plot.py`: targets, times to target, medians.

Standard library only and no side effects at import, so the unit test imports it and the
benchmark's arithmetic is checked without starting a run.

A curve is a list of evaluation points `{"step", "train_seconds", "accuracy"}` in step order,
`train_seconds` counting training only (rollout + update + weight sync) since the first step.
A "never" (a run that did not reach the target) is None in JSON and +inf inside medians.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import median_or_never, spread  # noqa: F401 - median_or_never: part of this module's API


def time_to_target(curve: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first evaluation at or above `target` (None if never)."""
    return next((p["train_seconds"] for p in curve if p["accuracy"] >= target), None)


def target_accuracy(initial: list[float], finals: dict[str, list[float]], fraction: float) -> dict[str, Any]:
    """The target of one workload, from its own runs: initial + fraction * (best_final - initial).

    `initial` holds every run's step-0 accuracy (median taken), `finals` each system's runs' final
    accuracies; `best_final` is the best system median. A fixed target means nothing when the
    model starts elsewhere on another machine. None when no system improved on the start.
    """
    medians = {name: statistics.median(v) for name, v in finals.items() if v}
    if not initial or not medians:
        return {"accuracy": None, "initial": None, "best_final": None, "best_system": None,
                "fraction": fraction, "note": "no successful runs"}
    start = statistics.median(initial)
    best_system = max(medians, key=medians.get)
    best = medians[best_system]
    result = {"initial": start, "best_final": best, "best_system": best_system, "fraction": fraction}
    if best <= start:
        return {"accuracy": None, **result, "note": "no system improved on the initial accuracy"}
    return {"accuracy": start + fraction * (best - start), **result}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded, None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def speedup(baseline: float | None, candidates: dict[str, float | None]) -> dict[str, Any]:
    """Baseline's median seconds to target over the fastest candidate's (None: never reached).

    {"speedup": x, "best_system": name}; speedup None when no candidate reached the target or the
    baseline never did (then the note says so: the speedup is unbounded, not unknown).
    """
    reached = {name: s for name, s in candidates.items() if s is not None}
    if not reached:
        return {"speedup": None, "best_system": None, "note": "no rl-train system reached the target"}
    best = min(reached, key=reached.get)
    if baseline is None:
        return {"speedup": None, "best_system": best, "note": "the baseline never reached the target"}
    return {"speedup": ratio(baseline, reached[best]), "best_system": best}


def mean_prefixed(rows: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Mean over rows of every numeric key starting with `prefix` (over the rows that have it)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, []).append(float(value))
    return {key: round(statistics.fmean(v), 6) for key, v in sorted(values.items())}


def drop_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Totals over rows of the `rollout/*drops*` counters; dict-valued ones (reason -> count) flattened."""
    totals: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if not (key.startswith("rollout/") and "drops" in key):
                continue
            items = value.items() if isinstance(value, dict) else [("", value)]
            for reason, count in items:
                name = f"{key}/{reason}" if reason else key
                totals[name] = totals.get(name, 0) + int(count)
    return dict(sorted(totals.items()))


def median_curve(curves: list[list[dict[str, Any]]]) -> list[dict[str, float]]:
    """Per evaluated step, the median training seconds and median accuracy over the curves that have it."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for curve in curves:
        for point in curve:
            by_step.setdefault(point["step"], []).append(point)
    return [{"step": step, "train_seconds": statistics.median(p["train_seconds"] for p in points),
             "accuracy": statistics.median(p["accuracy"] for p in points)}
            for step, points in sorted(by_step.items())]


def summarize_system(runs: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """One system's figures over its seeds: medians with (min, max); failed runs only counted."""
    ok = [r for r in runs if r.get("ok")]
    times = [time_to_target(r["curve"], target) for r in ok] if target is not None else []
    figures = {key: spread(r[key] for r in ok) for key in
               ("seconds_per_step", "completion_tokens_per_s", "generated_tokens_per_s")}
    pipeline_keys = sorted({k for r in ok for k in r.get("pipeline", {})})
    drop_keys = sorted({k for r in ok for k in r.get("rollout_drops", {})})
    return {
        "runs": len(runs), "failed": len(runs) - len(ok),
        "reached": sum(t is not None for t in times),
        "seconds_to_target": spread(times) if target is not None else None,
        "initial_accuracy": spread(r["curve"][0]["accuracy"] for r in ok),
        "final_accuracy": spread(r["curve"][-1]["accuracy"] for r in ok),
        **figures,
        "pipeline": {k: spread(r["pipeline"][k] for r in ok if k in r.get("pipeline", {}))["median"]
                     for k in pipeline_keys},
        "rollout_drops": {k: spread(r["rollout_drops"].get(k, 0) for r in ok)["median"] for k in drop_keys},
    }


def summarize_workload(runs: dict[str, list[dict[str, Any]]], fraction: float, baseline: str = "trl",
                       april: str = "april", pipeline: str = "april_pipeline") -> dict[str, Any]:
    """Target, per-system figures, speedup to target and pipeline-vs-APRIL s/step of one workload.

    `runs` maps each system to its runs (one per seed). Every successful run with a curve takes
    part in the target; the baseline's time to target is compared with the best other system's.
    """
    ok = {name: [r for r in rs if r.get("ok") and r.get("curve")] for name, rs in runs.items()}
    target = target_accuracy([r["curve"][0]["accuracy"] for rs in ok.values() for r in rs],
                             {name: [r["curve"][-1]["accuracy"] for r in rs] for name, rs in ok.items()},
                             fraction)
    systems = {name: summarize_system(rs, target["accuracy"]) for name, rs in runs.items()}
    medians = {name: s["seconds_to_target"]["median"] if s["seconds_to_target"] else None
               for name, s in systems.items()}
    fastest = speedup(medians.get(baseline), {n: m for n, m in medians.items() if n != baseline})
    if target["accuracy"] is None:
        fastest["note"] = f"no target: {target['note']}"
    if fastest["speedup"] is None and fastest["best_system"] is not None and ok.get(baseline):
        # The baseline's runs that never reached it trained their whole budget without: that time
        # is a lower bound of theirs, so the speedup is at least this (not unknown, not infinite).
        times = [time_to_target(r["curve"], target["accuracy"]) for r in ok[baseline]]
        floors = [r["curve"][-1]["train_seconds"] if t is None else t for r, t in zip(ok[baseline], times)]
        fastest["at_least"] = ratio(statistics.median(floors), medians[fastest["best_system"]])
    per_step = {name: s["seconds_per_step"]["median"] for name, s in systems.items()}
    return {"target": target, "systems": systems,
            "speedup_to_target": fastest["speedup"], "speedup_best_system": fastest["best_system"],
            **({"speedup_note": fastest["note"]} if "note" in fastest else {}),
            **({"speedup_to_target_at_least": fastest["at_least"]} if "at_least" in fastest else {}),
            "pipeline_vs_april_seconds_per_step": ratio(per_step.get(april), per_step.get(pipeline))}
