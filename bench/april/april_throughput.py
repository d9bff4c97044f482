"""APRIL vs synchronous rollouts on the real vLLM engine, stepped as training steps them.

Workload: every sample's response length is drawn from a heavy-tailed distribution (default:
log-normal with sigma 1, so about 1% of responses run past ten times the median, the shape
reported for RL reasoning rollouts) and enforced with `ignore_eos` and a per-sample budget.
Every mode runs on one engine and the same prompts (sample i of prompt uid always gets the same
length), interleaved step by step after warm-up steps, and every step ends as a training step
does: wait for idle, `update_weights` (unchanged weights; the prefix cache is reset and the
policy version bumped), so APRIL's buffer ages and is dropped past `max_staleness` as in
training. Modes per repetition:
  long tail: synchronous (N'=N, no recycling); synchronous with N' groups in flight (returns N'
  groups per step: the same concurrency as APRIL); APRIL at each `--staleness`;
  no tail (every length = the long tail's mean): raw `generate` with N*G and N'*G requests
  (no streaming, no scheduler) and APRIL at the headline staleness.
The headline `speedup` is APRIL over synchronous useful tokens per second of rollout + weight
sync (what training pays); `speedup_rollout_only` leaves the sync out. Wasted tokens: generated
tokens dropped as stale or unfinished; tokens still buffered at the end are reported apart.

    python -m bench.april.april_throughput          # 3 reps x 30 steps, ~10-15 min on 2 cores
    python -m bench.april.april_throughput --dist pareto --reps 1
    python -m bench.april.april_throughput --lengths-file lengths.txt --out /tmp/r.json
    python -m bench.april.april_throughput --table-from bench/results/april_throughput.json

Writes bench/results/april_throughput.json (or --out) and prints the README's Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.april.april_steps import RawMode, SchedulerMode, interleaved, percentile, summarize
from bench.common import RESULTS, machine, save_json, spread

DEFAULT_OUT = RESULTS / "april_throughput.json"


# ---- workload ----------------------------------------------------------------------------------


def length_sampler(args: argparse.Namespace, seed: int) -> Callable[[int, int], int]:
    """(uid, index) -> response length, deterministic for `seed`, clamped to [1, max_len]."""
    if args.lengths_file:
        profile = [int(x) for x in Path(args.lengths_file).read_text().split() if x.strip()]
        if not profile or min(profile) < 1:
            sys.exit(f"{args.lengths_file}: need one positive length per line")
        return lambda uid, i: min(args.max_len, profile[(uid * args.group_size + i) % len(profile)])
    med, mx = args.median, args.max_len
    draw = {
        "lognormal": lambda r: med * math.exp(r.gauss(0.0, args.sigma)),
        "pareto": lambda r: med / 2 ** (1 / args.alpha) * r.paretovariate(args.alpha),
        "exponential": lambda r: r.expovariate(math.log(2) / med),
        "uniform": lambda r: r.uniform(1, 2 * med),
        "constant": lambda r: med,
    }[args.dist]

    def length(uid: int, i: int) -> int:
        r = random.Random(f"{seed}:{uid}:{i}")
        return max(1, min(mx, round(draw(r))))
    return length


def profile_stats(length, n: int = 20000) -> dict:
    """The length distribution a workload draws from (sampled off the benchmark's uids)."""
    xs = sorted(length(10**7 + k // 64, k % 64) for k in range(n))
    pct = lambda q: xs[min(n - 1, int(q * n))]  # noqa: E731
    return {"mean": sum(xs) / n, "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "max": xs[-1], "frac_over_10x_median": sum(x > 10 * pct(0.5) for x in xs) / n}


class Prompts:
    """Arithmetic questions with uids 0, 1, ...; both schedulers see the same sequence."""

    def __init__(self, tokenizer, seed: int) -> None:
        from rollover.tasks.arithmetic import arithmetic_record

        self.record, self.tokenizer, self.seed, self.uid = arithmetic_record, tokenizer, seed, 0

    def __call__(self) -> tuple[int, dict, list[int]]:
        uid, self.uid = self.uid, self.uid + 1
        rec = self.record(self.seed, uid, 1, 3, 2, True)
        return uid, rec, self.tokenizer.encode(rec["question"])


def no_score(group) -> None:
    """Rewards are irrelevant to throughput (no filter runs)."""
    for s in group.samples:
        s.reward = 0.0


# ---- one repetition ----------------------------------------------------------------------------


def make_scheduler(engine, tokenizer, args: argparse.Namespace, length, seed: int, *, groups: int,
                   over_provision: float, partial: bool, max_staleness: int) -> Any:
    """An AprilScheduler on the benchmark's prompts; `length` sets every sample's budget."""
    from rollover.rollout.april import STREAM_INTERVAL, AprilScheduler
    from rollover.rollout.engine import SamplingSettings

    cfg = SimpleNamespace(groups_per_step=groups, group_size=args.group_size,
                          over_provision=over_provision, partial=partial,
                          max_staleness=max_staleness, max_tokens=args.max_len,
                          temperature=1.0, top_p=1.0)
    return AprilScheduler(engine, cfg, Prompts(tokenizer, seed), no_score,
                          sampling=SamplingSettings(temperature=1.0, ignore_eos=True,
                                                    stream_interval=STREAM_INTERVAL),
                          budget_fn=lambda g, i: length(g.uid, i))


def april_name(staleness: int) -> str:
    """The long-tail APRIL mode's name for one max_staleness."""
    return f"april_s{staleness}"


async def repetition(engine, tokenizer, weights, args: argparse.Namespace, rep: int,
                     log) -> tuple[dict, dict]:
    """One repetition: (its results, returned lengths per long-tail mode for pooling)."""
    seed = args.seed + rep
    long_len = length_sampler(args, seed)
    mean_len = max(1, round(profile_stats(long_len)["mean"]))
    n, n_wide = args.groups, math.ceil(args.over_provision * args.groups)

    def sched(length, **kw) -> SchedulerMode:
        return SchedulerMode(make_scheduler(engine, tokenizer, args, length, seed, **kw))

    head = args.staleness[0]
    tail_modes = {
        "sync": sched(long_len, groups=n, over_provision=1.0, partial=False, max_staleness=head),
        "sync_wide": sched(long_len, groups=n_wide, over_provision=1.0, partial=False, max_staleness=head),
        **{april_name(s): sched(long_len, groups=n, over_provision=args.over_provision, partial=True,
                                max_staleness=s) for s in args.staleness},
    }
    log(f"rep {rep} (seed {seed}): long-tail workload")
    tail = await interleaved(engine, weights, tail_modes, args.warmup, args.steps, log)
    raw_prompts = Prompts(tokenizer, seed + 10**6)
    flat_modes = {
        "raw_generate": RawMode(engine, n * args.group_size, mean_len, raw_prompts),
        "raw_generate_wide": RawMode(engine, n_wide * args.group_size, mean_len, raw_prompts),
        "april": sched(lambda uid, i: mean_len, groups=n, over_provision=args.over_provision,
                       partial=True, max_staleness=head),
    }
    # APRIL's no-tail steps alternate (all N' groups finish together: the surplus makes the
    # next step nearly free), so an even number of measured steps covers whole cycles.
    log(f"rep {rep}: no-tail workload, every length {mean_len}")
    flat = await interleaved(engine, weights, flat_modes, args.warmup, args.steps + args.steps % 2, log)
    for m in (*tail_modes.values(), *flat_modes.values()):
        m.close()
    lengths = {name: [x for r in recs for x in r["lengths"]] for name, recs in tail.items()}
    tail_s = {name: summarize(recs) for name, recs in tail.items()}
    flat_s = {name: summarize(recs) for name, recs in flat.items()}
    rate = lambda d, m, key="useful_tokens_per_s": d[m][key]  # noqa: E731
    result = {
        "rep": rep, "seed": seed,
        "speedup": {str(s): rate(tail_s, april_name(s)) / rate(tail_s, "sync") for s in args.staleness},
        "speedup_rollout_only": {
            str(s): rate(tail_s, april_name(s), "useful_tokens_per_s_rollout")
            / rate(tail_s, "sync", "useful_tokens_per_s_rollout") for s in args.staleness},
        "speedup_vs_same_concurrency": {
            str(s): rate(tail_s, april_name(s)) / rate(tail_s, "sync_wide") for s in args.staleness},
        "wasted_token_fraction": {str(s): tail_s[april_name(s)]["wasted_token_fraction"]
                                  for s in args.staleness},
        "no_tail_ratio": rate(flat_s, "april") / rate(flat_s, "raw_generate_wide"),
        "no_tail_ratio_vs_raw_n": rate(flat_s, "april") / rate(flat_s, "raw_generate"),
        "long_tail": tail_s,
        "no_tail": {"length": mean_len, **flat_s},
    }
    return result, lengths


# ---- aggregation and the README table ---------------------------------------------------------


def aggregate(reps: list[dict], lengths: dict[str, list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Top-level keys: medians over repetitions with their min/max."""
    per = lambda key, s: [r[key][s] for r in reps]  # noqa: E731
    keys = [str(s) for s in args.staleness]
    head = keys[0]
    out = {
        "speedup": {s: spread(per("speedup", s)) for s in keys},
        f"speedup_staleness_{head}": statistics.median(per("speedup", head)),
        "headline": {"max_staleness": int(head),
                     "basis": "useful tokens per second of rollout + weight sync, APRIL over "
                              "synchronous (N'=N), median of repetitions"},
        "speedup_rollout_only": {s: spread(per("speedup_rollout_only", s)) for s in keys},
        "speedup_vs_same_concurrency": {s: spread(per("speedup_vs_same_concurrency", s)) for s in keys},
        "no_tail_ratio": statistics.median(r["no_tail_ratio"] for r in reps),
        "no_tail_ratio_spread": spread([r["no_tail_ratio"] for r in reps]),
        "no_tail_ratio_vs_raw_n": spread([r["no_tail_ratio_vs_raw_n"] for r in reps]),
        "wasted_token_fraction": {s: spread(per("wasted_token_fraction", s)) for s in keys},
        "buffered_tokens_end": {s: [r["long_tail"][april_name(int(s))]["buffered_tokens_end"]
                                    for r in reps] for s in keys},
        "returned_length": {m: {"p50": percentile(xs, 0.5), "p99": percentile(xs, 0.99)}
                            for m, xs in lengths.items()},
        "workload": {"long_tail": profile_stats(length_sampler(args, args.seed)),
                     "no_tail_length": reps[0]["no_tail"]["length"]},
        "repetitions": reps,
    }
    return out


def render_table(result: dict[str, Any]) -> str:
    """The README's "APRIL rollout throughput" table, from a result JSON."""
    cfg, reps, w = result["config"], result["repetitions"], result["workload"]["long_tail"]
    med = lambda part, mode, key="useful_tokens_per_s": statistics.median(  # noqa: E731
        r[part][mode][key] for r in reps)
    rng = lambda d: f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"  # noqa: E731
    length = lambda m: "{p50} / {p99}".format(**result["returned_length"][m])  # noqa: E731
    n, g, op = cfg["groups"], cfg["group_size"], cfg["over_provision"]
    n_wide = math.ceil(op * n)
    m = result["machine"]
    lines = [
        f"{cfg['model']}, N={n} groups x G={g}, APRIL over-provision {op:g}x; {len(reps)} "
        f"repetitions x {cfg['steps']} measured steps per mode after {cfg['warmup']} warm-up, "
        "interleaved on one engine. Every step ends as in training: wait for idle, "
        "`update_weights` (same weights; prefix cache reset, policy version bumped). Tokens/s "
        "count rollout + weight sync; ratios are medians (min-max) over repetitions. Load "
        f"average {m['load_avg_start'][0]:.1f} at start, {m.get('load_avg_end', [0])[0]:.1f} at end.",
        "",
        "| workload | mode | useful tokens/s | ratio | ratio, rollout time only | wasted tokens "
        "| returned length p50 / p99 |",
        "|---|---|---|---|---|---|---|",
        f"| long tail ({cfg['dist']}, median {w['median']}, mean {w['mean']:.0f}, p99 {w['p99']}) "
        f"| synchronous (N'=N) | {med('long_tail', 'sync'):.0f} | 1.00 | 1.00 | 0% | {length('sync')} |",
        f"| long tail | synchronous, N'={n_wide} groups in flight and returned | "
        f"{med('long_tail', 'sync_wide'):.0f} | {med('long_tail', 'sync_wide') / med('long_tail', 'sync'):.2f}"
        f" | | 0% | {length('sync_wide')} |",
    ]
    for s, sp in result["speedup"].items():
        name = april_name(int(s))
        target = " (target >= 1.3x)" if int(s) == result["headline"]["max_staleness"] else ""
        lines.append(
            f"| long tail | APRIL, max_staleness={s} | {med('long_tail', name):.0f} | "
            f"**{rng(sp)}x**{target} | {rng(result['speedup_rollout_only'][s])}x | "
            f"{100 * result['wasted_token_fraction'][s]['median']:.1f}% | {length(name)} |")
    lines += [
        f"| no tail (all lengths {result['workload']['no_tail_length']}) | raw vLLM `generate`, "
        f"{n * g} requests | {med('no_tail', 'raw_generate'):.0f} | | | | |",
        f"| no tail | raw vLLM `generate`, {n_wide * g} requests | "
        f"{med('no_tail', 'raw_generate_wide'):.0f} | 1.00 | | | |",
        f"| no tail | APRIL, max_staleness={result['headline']['max_staleness']} | "
        f"{med('no_tail', 'april'):.0f} | **{rng(result['no_tail_ratio_spread'])}** (target >= 0.90) "
        f"| | {100 * med('no_tail', 'april', 'wasted_token_fraction'):.1f}% | |",
        "",
        "APRIL over synchronous at the same concurrency (N' groups in flight): " + ", ".join(
            f"max_staleness={s} {rng(v)}x" for s, v in result["speedup_vs_same_concurrency"].items())
        + ". Wasted tokens: generated, then dropped as stale or unfinished; tokens still buffered "
        "at the end (not waste yet), per repetition: " + ", ".join(
            f"max_staleness={s} {v}" for s, v in result["buffered_tokens_end"].items()) + ".",
    ]
    return "\n".join(lines)


# ---- entry point -------------------------------------------------------------------------------


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The options `length_sampler` and the prompt batches read (shared by the rollout benches)."""
    p.add_argument("--dist", default="lognormal",
                   choices=["lognormal", "pareto", "exponential", "uniform", "constant"])
    p.add_argument("--lengths-file", help="one response length per line, replayed in order")
    p.add_argument("--median", type=int, default=32, help="median response length (tokens)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma")
    p.add_argument("--alpha", type=float, default=1.5, help="Pareto shape")
    p.add_argument("--max-len", type=int, default=448, help="length cap (context is 512)")
    p.add_argument("--groups", type=int, default=8, help="N groups per step")
    p.add_argument("--group-size", type=int, default=8, help="G samples per group")


def add_run_args(p: argparse.ArgumentParser, default_out: Path, table: bool = True) -> None:
    """How an engine benchmark repeats and where it writes: --reps --seed --model --out, and
    --table-from when it renders a README table."""
    p.add_argument("--reps", type=int, default=3, help="repetitions (seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="builtin:tiny-math")
    p.add_argument("--out", type=Path, default=default_out)
    if table:
        p.add_argument("--table-from", type=Path, metavar="JSON",
                       help="print the Markdown table of an existing result and exit")


def recipe_max_staleness() -> int:
    """The recipe's default `rollout.max_staleness`: what training uses unless told otherwise."""
    from rollover.rollout.config import RolloutConfig

    return RolloutConfig.model_fields["max_staleness"].default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--over-provision", type=float, default=2.0, help="N'/N for APRIL")
    p.add_argument("--staleness", default=None,
                   help="APRIL max_staleness values, comma-separated; the first is the headline "
                        "(default: the recipe default, 4, then 2,1)")
    p.add_argument("--steps", type=int, default=30,
                   help="measured steps per mode and repetition (no tail: rounded up to even)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per mode and repetition")
    add_run_args(p, DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.staleness is None:
        args.staleness = ",".join(str(s) for s in dict.fromkeys([recipe_max_staleness(), 2, 1]))
    args.staleness = list(dict.fromkeys(int(s) for s in str(args.staleness).split(",") if s.strip()))
    if not args.staleness or min(args.staleness) < 0 or args.reps < 1 or args.steps < 1:
        p.error("need --staleness values >= 0, --reps >= 1 and --steps >= 1")
    return args


def load_weights(model_path: str) -> dict[str, Any]:
    """The model's checkpoint tensors, loaded once and pushed after every step."""
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if not weights:
        sys.exit(f"{model_path}: no *.safetensors to push as weights")
    return weights


async def bench(engine, weights, args: argparse.Namespace, log) -> dict[str, Any]:
    """Every repetition on one engine, then the medians."""
    tokenizer = engine.llm.get_tokenizer()
    reps, pooled = [], {}
    for rep in range(args.reps):
        result, lengths = await repetition(engine, tokenizer, weights, args, rep, log)
        reps.append(result)
        for mode, xs in lengths.items():
            pooled.setdefault(mode, []).extend(xs)
        log(f"rep {rep}: speedup {result['speedup']}  no_tail_ratio {result['no_tail_ratio']:.2f}")
    return aggregate(reps, pooled, args)


async def start_one_engine(model_path: str, args: argparse.Namespace) -> tuple[Any, Callable[[], None]]:
    """The benchmarks' in-process engine, and how to stop it."""
    from rollover.rollout.engine import EngineSettings, RolloutEngine

    engine = RolloutEngine(EngineSettings(model=model_path, max_model_len=512, seed=args.seed,
                                          enable_prefix_caching=True, kv_cache_gib=2.0)).start()
    return engine, engine.shutdown


def run_on_engine(args: argparse.Namespace, bench_fn, render_table, start=start_one_engine) -> dict[str, Any]:
    """Start the engine(s) on `args.model` (`start(model_path, args)` -> (engine, stop)), run
    `bench_fn(engine, weights, args, log)`, save the JSON with the machine and config to
    `args.out`, print the Markdown table; return the result."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rollover.trainer.builtin.models import resolve_model_path

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    started = time.perf_counter()
    model_path = resolve_model_path(args.model)
    weights = load_weights(model_path)
    info = machine()  # torch is imported by now: the GPU, if any, is named
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    engine, stop = loop.run_until_complete(start(model_path, args))
    try:
        result = loop.run_until_complete(bench_fn(engine, weights, args, log))
    finally:
        stop()
    info["load_avg_end"] = list(os.getloadavg())
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["machine"] = info
    result["bench_wall_s"] = time.perf_counter() - started
    save_json(result, args.out)
    log("\n" + render_table(result) + "\n")
    return result


def run_or_render(args: argparse.Namespace, bench_fn, render_table) -> dict[str, Any]:
    """With --table-from, print the table of a stored result and return {}; else run the
    benchmark on the engine (`run_on_engine`) and return its result."""
    if args.table_from:
        print(render_table(json.loads(args.table_from.read_text())))
        return {}
    return run_on_engine(args, bench_fn, render_table)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run_or_render(args, bench, render_table)
    if not result:
        return result
    head = result["headline"]["max_staleness"]
    print(f"speedup (max_staleness={head}) {result[f'speedup_staleness_{head}']:.2f}x  "
          f"no_tail_ratio {result['no_tail_ratio']:.2f}  -> {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
