"""Adaptive over-provisioning (`over_provision: auto`) against fixed ratios, on the real engine.

Workloads are those of `april_throughput.py` (same length sampler, prompts and scheduler
construction): the long tail (log-normal lengths by default) and the no-tail one (every length
the long tail's mean). On top, a dynamic-sampling-like filter rejects a fixed fraction of the
groups (default 30%, deterministic per uid, so every mode rejects the same prompts), as training
sees. Per workload the modes are APRIL with N' = ceil(r x N) for each `--ratios` r, and `auto`;
all stepped in turn on one engine as `april_steps.interleaved` does, every step ending with a
weight sync that bumps the policy version, so buffers age and staleness drops happen as in
training.

Metric: useful (returned) tokens per second of rollout + weight sync. Also per mode: wasted
tokens (dropped as stale or unfinished), tokens of filtered groups (the filter's cost, not the
provisioning's, reported apart), the off-policy share of returned tokens, and the N' used.
`ratio_auto_over_best_fixed` per workload: auto's rate over the best fixed ratio's rate of the
same repetition, median (min-max) over repetitions.

    python -m bench.april.over_provision           # 3 reps x 20 steps, ~10 min on 2 cores
    python -m bench.april.over_provision --reps 1 --steps 3 --warmup 1 --groups 2 --out /tmp/op.json
    python -m bench.april.over_provision --table-from bench/results/over_provision.json

Writes bench/results/over_provision.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import asdict
from typing import Any

from bench.april.april_steps import SchedulerMode, interleaved, summarize
from bench.april.april_throughput import (
    add_run_args,
    add_workload_args,
    length_sampler,
    make_scheduler,
    profile_stats,
    recipe_max_staleness,
    run_or_render,
)
from bench.common import RESULTS, spread

DEFAULT_OUT = RESULTS / "over_provision.json"
WORKLOADS = ("long_tail", "no_tail")


# ---- the filter and the measured mode ----------------------------------------------------------


def rejects(uid: int, fraction: float, seed: int) -> bool:
    """Whether the filter rejects prompt `uid`: the same answer in every mode."""
    return random.Random(f"filter:{seed}:{uid}").random() < fraction


class FilteredMode(SchedulerMode):
    """`SchedulerMode` with the uid filter; records also carry auto's plan for the step."""

    def __init__(self, scheduler: Any, fraction: float, seed: int) -> None:
        super().__init__(scheduler)
        self.filter_by(lambda group: rejects(group.uid, fraction, seed))

    async def rollout(self) -> dict[str, Any]:
        rec = await super().rollout()
        plan = getattr(self.scheduler.provision, "last_plan", None)
        if plan is not None:
            rec["plan"] = asdict(plan)
        return rec


def mode_name(ratio: float | str) -> str:
    return "auto" if ratio == "auto" else f"fixed_{ratio:g}"


def summarize_mode(records: list[dict[str, Any]]) -> dict[str, Any]:
    """`april_steps.summarize` plus the filter's tokens, off-policy share and N' used."""
    out = summarize(records)
    filtered = sum(r["filtered_tokens"] for r in records)
    offpolicy = sum(r["offpolicy_tokens"] for r in records)
    ns = [r["n_in_flight"] for r in records]
    out.update(filtered_tokens=filtered,
               filtered_token_fraction=filtered / out["generated_tokens"] if out["generated_tokens"] else 0.0,
               offpolicy_token_fraction=offpolicy / out["useful_tokens"] if out["useful_tokens"] else 0.0,
               n_in_flight=spread(ns))
    return out


# ---- one repetition ----------------------------------------------------------------------------


async def repetition(engine, tokenizer, weights, args: argparse.Namespace, rep: int, log) -> dict:
    """Both workloads, every mode interleaved; per workload the summaries and auto's ratios."""
    seed = args.seed + rep
    long_len = length_sampler(args, seed)
    mean_len = max(1, round(profile_stats(long_len)["mean"]))
    lengths = {"long_tail": long_len, "no_tail": lambda uid, i: mean_len}
    result: dict[str, Any] = {"rep": rep, "seed": seed, "no_tail_length": mean_len}
    for workload in WORKLOADS:
        modes = {}
        for ratio in [*args.ratios, "auto"]:
            sched = make_scheduler(engine, tokenizer, args, lengths[workload], seed, groups=args.groups,
                                   over_provision=ratio, partial=True, max_staleness=args.staleness)
            modes[mode_name(ratio)] = FilteredMode(sched, args.reject, seed)
        log(f"rep {rep} (seed {seed}): {workload}")
        recs = await interleaved(engine, weights, modes, args.warmup, args.steps, log)
        for m in modes.values():
            m.close()
        summary = {name: summarize_mode(r) for name, r in recs.items()}
        rate = {name: s["useful_tokens_per_s"] for name, s in summary.items()}
        fixed = {name: v for name, v in rate.items() if name != "auto"}
        best = max(fixed, key=fixed.get)
        result[workload] = {
            "modes": summary,
            "best_fixed": best,
            "ratio_auto_over_best_fixed": rate["auto"] / fixed[best],
            "ratio_auto_over": {name: rate["auto"] / v for name, v in fixed.items()},
        }
        log(f"rep {rep} {workload}: auto / best fixed ({best}) = "
            f"{result[workload]['ratio_auto_over_best_fixed']:.3f}")
    return result


# ---- aggregation and the table -----------------------------------------------------------------


def aggregate(reps: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Medians (min-max) over repetitions, per workload and mode."""
    out: dict[str, Any] = {"ratio_auto_over_best_fixed": {}, "workloads": {}}
    names = [mode_name(r) for r in [*args.ratios, "auto"]]
    for w in WORKLOADS:
        per = lambda name, key: [r[w]["modes"][name][key] for r in reps]  # noqa: E731
        keys = ("useful_tokens_per_s", "wasted_token_fraction", "wasted_tokens",
                "filtered_token_fraction", "offpolicy_token_fraction")
        modes = {name: {**{k: spread(per(name, k)) for k in keys},
                        "n_in_flight_median": spread([n["median"] for n in per(name, "n_in_flight")])}
                 for name in names}
        ratios = [r[w]["ratio_auto_over_best_fixed"] for r in reps]
        out["workloads"][w] = {
            "modes": modes,
            "best_fixed": max((n for n in names if n != "auto"),
                              key=lambda n: modes[n]["useful_tokens_per_s"]["median"]),
            "ratio_auto_over_best_fixed": spread(ratios),
            "ratio_auto_over": {n: spread([r[w]["ratio_auto_over"][n] for r in reps])
                                for n in names if n != "auto"},
        }
        out["ratio_auto_over_best_fixed"][w] = statistics.median(ratios)
    out["workload"] = {"long_tail": profile_stats(length_sampler(args, args.seed)),
                       "no_tail_length": reps[0]["no_tail_length"]}
    out["repetitions"] = reps
    return out


def render_table(result: dict[str, Any]) -> str:
    """A Markdown table of a result JSON."""
    cfg, w = result["config"], result["workload"]["long_tail"]
    def rng(d: dict, f: str = "{:.0f}") -> str:
        return f"{f.format(d['median'])} ({f.format(d['min'])}-{f.format(d['max'])})"

    pct = lambda d: f"{100 * d['median']:.1f}%"  # noqa: E731
    lines = [
        f"{cfg['model']}, N={cfg['groups']} x G={cfg['group_size']}, max_staleness={cfg['staleness']}, "
        f"{100 * cfg['reject']:.0f}% of groups rejected by the filter; {cfg['reps']} repetitions x "
        f"{cfg['steps']} measured steps per mode after {cfg['warmup']} warm-up, interleaved, every "
        "step followed by a weight sync. Tokens/s: rollout + weight sync; median (min-max).",
        "",
        "| workload | mode | N' (median) | useful tokens/s | auto / this | wasted | filtered | off-policy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("long_tail", f"long tail ({cfg['dist']}, median {w['median']}, p99 {w['p99']})"),
                        ("no_tail", f"no tail (all {result['workload']['no_tail_length']})")):
        part = result["workloads"][name]
        for mode, s in part["modes"].items():
            vs = part["ratio_auto_over"].get(mode)
            lines.append(f"| {label} | {mode} | {s['n_in_flight_median']['median']:g} | "
                         f"{rng(s['useful_tokens_per_s'])} | {rng(vs, '{:.2f}') if vs else ''} | "
                         f"{pct(s['wasted_token_fraction'])} | {pct(s['filtered_token_fraction'])} | "
                         f"{pct(s['offpolicy_token_fraction'])} |")
        lines.append(f"| {label} | **auto / best fixed ({part['best_fixed']})** | | | "
                     f"**{rng(part['ratio_auto_over_best_fixed'], '{:.2f}')}** | | | |")
    return "\n".join(lines)


# ---- entry point -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--ratios", default="1.5,2,3", help="fixed over-provision ratios to compare")
    p.add_argument("--staleness", type=int, default=None,
                   help="max_staleness (default: the recipe default)")
    p.add_argument("--reject", type=float, default=0.3, help="fraction of groups the filter rejects")
    p.add_argument("--steps", type=int, default=20, help="measured steps per mode and repetition")
    p.add_argument("--warmup", type=int, default=4, help="warm-up steps per mode (auto's cold start)")
    add_run_args(p, DEFAULT_OUT)
    args = p.parse_args(argv)
    args.ratios = list(dict.fromkeys(float(r) for r in args.ratios.split(",") if r.strip()))
    if args.staleness is None:
        args.staleness = recipe_max_staleness()
    if (not args.ratios or min(args.ratios) < 1 or args.reps < 1 or args.steps < 1
            or args.staleness < 0 or not 0 <= args.reject < 1):
        p.error("need --ratios >= 1, --reps >= 1, --steps >= 1, --staleness >= 0, 0 <= --reject < 1")
    return args


async def bench(engine, weights, args: argparse.Namespace, log) -> dict[str, Any]:
    tokenizer = engine.llm.get_tokenizer()
    reps = [await repetition(engine, tokenizer, weights, args, rep, log) for rep in range(args.reps)]
    return aggregate(reps, args)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run_or_render(args, bench, render_table)
    if not result:
        return result
    print("ratio_auto_over_best_fixed " + ", ".join(
        f"{w} {v:.3f}" for w, v in result["ratio_auto_over_best_fixed"].items()) + f"  -> {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
