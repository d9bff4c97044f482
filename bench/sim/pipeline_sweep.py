"""Sync vs APRIL vs APRIL + pipeline at 1-1,024 simulated engines, on two calibrations.

Every run drives the product's loop (bench/sim/pipelined.py: `RolloutAhead`, `AprilScheduler`,
`EnginePool`) over simulated engines and a simulated trainer, in virtual time:
- `cpu`: this machine's measured costs (`scaling_sim.json`'s `calibration.used`, the same ones
  bench/sim/simulate_scale.py fitted) on the CPU workload (log-normal, median 32, cap 448);
- `gpu`: a 7B model on H100-class GPUs from published figures (bench/sim/gpu_profile.py, every
  figure cited in the JSON) on a long chain-of-thought workload (median 1,024 tokens, cap 16,384).
  Its train step is set from the published rollout share (75% of a synchronous step at 64
  engines), fitted once with a synchronous run (`--gpu-train-s` skips the fit).

    python -m bench.sim.pipeline_sweep                            # both, 1-1,024 engines (~25 min)
    python -m bench.sim.pipeline_sweep --profiles gpu --engines 64 --out /tmp/p.json
    python -m bench.sim.pipeline_sweep --quick --out /tmp/p.json  # seconds

Writes a summary (one row per run, no step records) under `pipeline` in
bench/results/scaling_sim.json, keeping the file's other sections; a run with the same
(profile, engines, mode) as a stored row replaces it, so the sweep can run in parts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, save_json
from bench.sim import gpu_profile
from bench.sim.pipelined import MODES, Profile, simulate_pipeline
from bench.sim.sim_engine import run_virtual, run_as_driver
from bench.sim.simulate_scale import DEFAULT_OUT
from bench.sim.scheduler_cpu import stored_costs

SECTION = "pipeline"
TARGET = {"profile": "gpu", "engines": "64", "ratio": 2.5,
          "text": "gpu profile, 64 engines: APRIL + pipeline >= 2.5x synchronous, no token older "
                  "than max_staleness"}


def cpu_profile(results: Path) -> tuple[Profile, dict[str, Any]]:
    """This machine's costs, as the stored simulator sweep used them."""
    args = argparse.Namespace(results=results, prefill_per_token_s=None, sync_s=None)
    costs, train_s, source = stored_costs(args)
    info = {"name": "cpu", "costs_from": source, "train_s": train_s,
            "used": {"base_s": costs.base_s, "per_seq_s": costs.per_seq_s, "sync_s": costs.sync_s,
                     "prefill_per_token_s": costs.prefill_per_token_s},
            "workload": {"dist": "lognormal", "median_tokens": 32, "sigma": 1.0, "max_len_tokens": 448},
            "block_tokens": 1}
    return Profile("cpu", costs, train_s), info


def gpu_base(train_s: float, name: str = "gpu") -> Profile:
    w, b = gpu_profile.WORKLOAD, gpu_profile.BLOCK
    return Profile(name, gpu_profile.gpu_costs(b), train_s, block=b, median=w["median_tokens"] / b,
                   sigma=w["sigma"], max_len=w["max_len_tokens"] // b, chunk=4, quantum=1.0)


def fit_gpu_train_s(args: argparse.Namespace) -> tuple[float, float]:
    """(train_s, synchronous rollout s/step at the reference engine count)."""
    ref = gpu_profile.REFERENCE_ENGINES
    run = run_virtual(simulate_pipeline(gpu_base(0.0), engines=ref, mode="sync",
                                        groups_per_engine=args.groups_per_engine,
                                        max_staleness=args.max_staleness, warmup=1, steps=2, seed=args.seed))
    rollout = run["trainer_wait_s_per_step"]  # max_async 0: the trainer waits for the whole rollout
    return gpu_profile.train_s_for(rollout, gpu_profile.gpu_costs().sync_s, args.rollout_share), rollout


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The table (profile -> engines -> mode -> figures), ratios to sync, and the target's check."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["profile"], r["engines"], list(MODES).index(r["mode"]))):
        table.setdefault(r["profile"], {}).setdefault(str(r["engines"]), {})[r["mode"]] = r
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for prof, by_engines in table.items():
        for engines, modes in by_engines.items():
            if "sync" in modes:
                base = modes["sync"]["useful_tokens_per_s"]
                ratios.setdefault(prof, {})[engines] = {
                    f"{m}_over_sync": v["useful_tokens_per_s"] / base for m, v in modes.items() if m != "sync"}
    out: dict[str, Any] = {"ratios": ratios}
    at = ratios.get(TARGET["profile"], {}).get(TARGET["engines"])
    if at:
        best = max((k for k in at if "pipe" in k), key=lambda k: at[k], default=None)
        modes = table[TARGET["profile"]][TARGET["engines"]]
        out["target"] = {**TARGET, "best_pipelined": best, "ratio": at.get(best),
                         "token_lag_max": max(v["token_lag_max"] for v in modes.values()),
                         "max_staleness": max(v["max_staleness"] for v in modes.values())}
        out["target"]["met"] = bool(best and at[best] >= TARGET["ratio"]
                                    and out["target"]["token_lag_max"] <= out["target"]["max_staleness"])
    return out


def render(section: dict[str, Any]) -> str:
    """The README's table: one row per profile and engine count."""
    lines = ["| calibration | engines | sync tok/s | APRIL | APRIL + pipeline (max_async 1) | "
             "APRIL + pipeline (2) | token lag max / mean (pipe 2) | engine / trainer busy (sync -> pipe 2) "
             "| scheduler CPU s/step (pipe 2) |", "|---|---|---|---|---|---|---|---|---|"]
    rows = {(r["profile"], r["engines"], r["mode"]): r for r in section["runs"]}
    for prof in sorted({p for p, _, _ in rows}, key=lambda p: (p != "cpu", p != "gpu", p)):
        for engines in sorted({e for p, e, _ in rows if p == prof}):
            get = lambda m: rows.get((prof, engines, m))  # noqa: E731
            sync, p2 = get("sync"), get("april_pipe2")
            if sync is None:
                continue
            cell = lambda m: (f"{get(m)['useful_tokens_per_s'] / sync['useful_tokens_per_s']:.2f}x"  # noqa: E731
                              if get(m) else "-")
            lines.append(
                f"| {prof} | {engines} | {sync['useful_tokens_per_s']:,.0f} | {cell('april')} | "
                f"{cell('april_pipe1')} | {cell('april_pipe2')} | "
                + (f"{p2['token_lag_max']} / {p2['token_lag_mean']:.2f} | "
                   f"{sync['engine_busy']:.2f} / {sync['trainer_busy']:.2f} -> "
                   f"{p2['engine_busy']:.2f} / {p2['trainer_busy']:.2f} | "
                   f"{p2['scheduler_cpu_s_per_step']:.3f} |" if p2 else "- | - | - |"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", default="cpu,gpu")
    p.add_argument("--engines", default="1,8,64,256,1024")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--groups-per-engine", type=int, default=4, help="N = this x engines (G = 8)")
    p.add_argument("--max-staleness", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="measured trainer steps, <= --big engines")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--big", type=int, default=64, help="above this engine count use --big-steps")
    p.add_argument("--big-steps", type=int, default=2)
    p.add_argument("--big-warmup", type=int, default=2)
    p.add_argument("--gpu-train-s", type=float, default=None, help="default: the stored fit, else fit")
    p.add_argument("--rollout-share", type=float, default=gpu_profile.ROLLOUT_SHARE,
                   help="gpu: rollout's share of a synchronous step; another value than the default "
                        "is a sensitivity run, profile `gpu_share<value>`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="1 and 2 engines, 1+2 steps, gpu train_s fixed")
    args = p.parse_args(argv)
    if args.quick:
        args.engines, args.steps, args.warmup = "1,2", 2, 1
        args.gpu_train_s = args.gpu_train_s if args.gpu_train_s is not None else 30.0
    try:
        args.engines = [int(x) for x in str(args.engines).split(",") if x.strip()]
    except ValueError:
        p.error(f"--engines takes comma-separated integers, not {args.engines!r}")
    args.profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    args.modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    if set(args.profiles) - {"cpu", "gpu"} or not args.profiles:
        p.error("--profiles takes cpu and/or gpu")
    if set(args.modes) - set(MODES) or not args.modes:
        p.error(f"--modes takes {', '.join(MODES)}")
    if not 0 < args.rollout_share < 1:
        p.error("--rollout-share must be between 0 and 1")
    if args.max_staleness < 2:
        p.error("--max-staleness must be >= 2 (the pipelined modes run max_async up to 2)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    section = result.get(SECTION, {"runs": [], "calibrations": {}})
    info, started = machine(), time.perf_counter()
    profiles: dict[str, Profile] = {}
    if "cpu" in args.profiles:
        profiles["cpu"], section["calibrations"]["cpu"] = cpu_profile(args.results)
    if "gpu" in args.profiles:
        cal, share = gpu_profile.calibration(), args.rollout_share
        name = "gpu" if share == gpu_profile.ROLLOUT_SHARE else f"gpu_share{share:g}"
        stored = section["calibrations"].get(name, {}).get("train_s")
        reference = section["calibrations"].get("gpu", {}).get("sync_rollout_s_at_reference")
        if args.gpu_train_s is not None:
            cal["train_s"], cal["train_s_from"] = args.gpu_train_s, "--gpu-train-s"
        elif name != "gpu" and reference is not None:  # the synchronous rollout does not depend on train_s
            cal["train_s"] = gpu_profile.train_s_for(reference, gpu_profile.gpu_costs().sync_s, share)
            cal["sync_rollout_s_at_reference"] = reference
            cal["train_s_from"] = (f"sensitivity: rollout share {share} of the stored synchronous "
                                   f"rollout {reference:.1f} s/step")
        elif stored is not None:
            cal["train_s"], cal["train_s_from"] = stored, section["calibrations"][name]["train_s_from"]
            cal["sync_rollout_s_at_reference"] = section["calibrations"][name].get("sync_rollout_s_at_reference")
        else:
            cal["train_s"], rollout = fit_gpu_train_s(args)
            cal["sync_rollout_s_at_reference"] = rollout
            cal["train_s_from"] = (f"rollout share {share}: synchronous rollout "
                                   f"{rollout:.1f} s/step at {gpu_profile.REFERENCE_ENGINES} engines "
                                   f"-> train_s = R (1 - share) / share - sync_s")
            print(f"gpu train_s fitted: {cal['train_s']:.1f} s (sync rollout {rollout:.1f} s/step)", flush=True)
        cal["rollout_share_used"] = share
        profiles[name] = gpu_base(cal["train_s"], name)
        section["calibrations"][name] = cal
    new = []
    for name, prof in profiles.items():
        for engines in args.engines:
            big = engines > args.big
            for mode in args.modes:
                run = run_virtual(simulate_pipeline(
                    prof, engines=engines, mode=mode, groups_per_engine=args.groups_per_engine,
                    max_staleness=args.max_staleness, warmup=args.big_warmup if big else args.warmup,
                    steps=args.big_steps if big else args.steps, seed=args.seed))
                new.append(run)
                print(f"{name} {engines:5d} engines {mode:12s} {run['useful_tokens_per_s']:12,.0f} tok/s  "
                      f"lag max {run['token_lag_max']} mean {run['token_lag_mean']:.2f}  "
                      f"busy engine {run['engine_busy']:.2f} trainer {run['trainer_busy']:.2f}  "
                      f"sched {run['scheduler_cpu_s_per_step']:.3f} s CPU/step  ({run['real_s']:.0f} s real)",
                      flush=True)
    keys = {(r["profile"], r["engines"], r["mode"]) for r in new}
    section["runs"] = [r for r in section["runs"] if (r["profile"], r["engines"], r["mode"]) not in keys] + new
    section.update({
        "question": "sync vs APRIL vs APRIL + pipeline (rollout.max_async 1, 2) through the product's "
                    "loop (rollout/pipeline.py RolloutAhead, AprilScheduler, EnginePool) over simulated "
                    "engines and a simulated trainer; useful = trained tokens per virtual second",
        "config": {"groups_per_engine": args.groups_per_engine, "group_size": 8, "over_provision": 2.0,
                   "max_staleness": args.max_staleness, "interrupt": "abort",
                   "steps": {"up_to_big": [args.warmup, args.steps], "above_big": [args.big_warmup, args.big_steps],
                             "big": args.big, "as": "[warm-up, measured]"}},
        "leaves_out": [
            "the trainer has devices of its own in every mode (a colocated synchronous system would "
            "lend the trainer's GPUs to rollout): ratios compare loops, not GPU budgets",
            "train_s is constant per step (the trainer scales with the batch, as engines do)",
            "per-sequence decode cost does not grow with context; no KV-cache limit or preemption",
            "scoring is free and instant; no network beyond sync_s; engines never fail",
            "tokens move in blocks (gpu: 64) and deliveries on a grid (quantum)",
        ],
        **summarize(section["runs"]),
    })
    info["load_avg_end"] = list(os.getloadavg())
    section.setdefault("machines", []).append({**info, "wall_s": time.perf_counter() - started,
                                               "profiles": args.profiles, "engines": args.engines})
    result[SECTION] = section
    save_json(result, args.out)
    print(render(section), flush=True)
    if "target" in section:
        t = section["target"]
        print(f"target ({t['text']}): {t['best_pipelined']} {t['ratio']:.2f}x, lag max "
              f"{t['token_lag_max']} -> {'met' if t['met'] else 'NOT met'}", flush=True)
    return result


if __name__ == "__main__":
    run_as_driver(main)
