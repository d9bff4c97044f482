"""One vs two rollout engines on Ray, measured here; and the simulator's projection to 256.

Measured part: two CPU engine actors (builtin:tiny-math) on a local Ray cluster, each bound to
its own core. Two modes step in turn on the same long-tailed workload as
`bench/april/april_throughput.py` (APRIL, over-provision 2, max_staleness 4): `engines_1`, a pool of one of
the actors, and `engines_2`, a pool of both. Every step ends as a training step does: wait for
idle, then the same weights pushed to both engines through the pool at a new version (the
policy version goes up once per round, as in training). On two cores the trainer-side event
loop, Ray and both engines share the machine, so two engines can at best match what the cores
allow: the target here is "lose nothing" (>= 0.9x), not 2x.

Projected part: `bench/sim/simulate_scale.py` (virtual time, the real scheduler and pool over
simulated engines); its JSON is merged in when present (`--sim`).

    python -m bench.sim.scaling                # 3 reps x 12 steps per mode, ~10 min on 2 cores
    python -m bench.sim.scaling --reps 1 --steps 4 --out /tmp/scaling.json

Writes bench/results/scaling.json (or --out) and prints the README's table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from bench.april.april_steps import SchedulerMode, interleaved, summarize
from bench.april.april_throughput import add_run_args, add_workload_args, length_sampler, make_scheduler, run_on_engine
from bench.common import RESULTS
from bench.sim.sim_engine import run_as_driver

MODES = ("engines_1", "engines_2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--over-provision", type=float, default=2.0)
    p.add_argument("--staleness", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="measured steps per mode and repetition")
    p.add_argument("--warmup", type=int, default=2)
    add_run_args(p, RESULTS / "scaling.json", table=False)
    p.add_argument("--sim", type=Path, default=RESULTS / "scaling_sim.json",
                   help="the simulator's JSON, merged in as `projection` when it exists")
    return p.parse_args(argv)


async def start_engines(model_path: str, args: argparse.Namespace) -> tuple[list[Any], Any]:
    """Two engine actors on a local Ray cluster, and how to stop them and Ray."""
    from rollover.rollout.cluster import EngineFactory, connect, disconnect
    from rollover.rollout.settings import EngineSettings
    from rollover.rollout.config import ClusterConfig

    connect("local", num_cpus=4)  # logical: two 1-CPU actors and room for Ray's own tasks
    factory = EngineFactory(EngineSettings(model=model_path, max_model_len=512, seed=args.seed,
                                           enable_prefix_caching=True, kv_cache_gib=2.0),
                            ClusterConfig(address="local", engines=2))
    engines = list(await asyncio.gather(factory.start(0), factory.start(1)))

    def stop() -> None:
        for engine in engines:
            engine.shutdown()
        disconnect()

    return engines, stop


async def measure(engines: list[Any], weights: dict[str, Any], args: argparse.Namespace, log) -> dict[str, Any]:
    from vllm.tokenizers import get_tokenizer

    from rollover.rollout.pool import EnginePool

    tokenizer = get_tokenizer(engines[0].settings.model)
    both, one = EnginePool(engines), EnginePool(engines[:1])
    reps = []
    for rep in range(args.reps):
        seed = args.seed + rep
        length = length_sampler(args, seed)
        modes = {name: SchedulerMode(make_scheduler(pool, tokenizer, args, length, seed, groups=args.groups,
                                                    over_provision=args.over_provision, partial=True,
                                                    max_staleness=args.staleness))
                 for name, pool in (("engines_1", one), ("engines_2", both))}
        log(f"rep {rep} (seed {seed})")
        kept = await interleaved(both, weights, modes, args.warmup, args.steps, log)
        for mode in modes.values():
            mode.close()
        summary = {name: summarize(records) for name, records in kept.items()}
        for name in MODES:
            summary[name].pop("steps")
        ratio = summary["engines_2"]["useful_tokens_per_s"] / summary["engines_1"]["useful_tokens_per_s"]
        reps.append({"rep": rep, "seed": seed, "ratio_2_over_1": ratio, **summary})
        log(f"rep {rep}: two engines / one = {ratio:.2f}x")
    result: dict[str, Any] = {"measured": {**aggregate(reps), "reps": reps}}
    if args.sim.is_file():  # its summary; the per-run step records stay in that file
        sim = json.loads(args.sim.read_text())
        result["projection"] = {"source": str(args.sim.name),
                                **{k: v for k, v in sim.items() if k not in ("runs", "parts")}}
    return result


def aggregate(reps: list[dict]) -> dict[str, Any]:
    ratios = [r["ratio_2_over_1"] for r in reps]
    rates = {m: [r[m]["useful_tokens_per_s"] for r in reps] for m in MODES}
    return {
        "ratio_2_over_1": statistics.median(ratios),
        "ratio_2_over_1_spread": {"min": min(ratios), "max": max(ratios), "all": ratios},
        "useful_tokens_per_s": {m: statistics.median(v) for m, v in rates.items()},
        "wasted_token_fraction": {m: statistics.median(r[m]["wasted_token_fraction"] for r in reps)
                                  for m in MODES},
    }


def render_table(result: dict[str, Any]) -> str:
    m = result["measured"]
    spread = m["ratio_2_over_1_spread"]
    rows = ["| engines (here, 2 cores) | useful tokens/s (median) | wasted tokens |", "|---|---|---|"]
    for name in MODES:
        rows.append(f"| {name[-1]} | {m['useful_tokens_per_s'][name]:.0f} | "
                    f"{m['wasted_token_fraction'][name]:.1%} |")
    rows.append(f"\nTwo engines / one: **{m['ratio_2_over_1']:.2f}x** (spread {spread['min']:.2f}-"
                f"{spread['max']:.2f} over {len(spread['all'])} repetitions).")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_on_engine(args, measure, render_table, start=start_engines)


if __name__ == "__main__":
    run_as_driver(main)
