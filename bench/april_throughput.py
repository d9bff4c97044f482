"""APRIL vs synchronous rollouts on the real vLLM engine: useful tokens per second.

Workload: every sample's response length is drawn from a heavy-tailed distribution (default:
log-normal with sigma 1, so about 1% of responses run past ten times the median, the shape
reported for RL reasoning rollouts) and enforced with `ignore_eos` and a per-sample budget.
Both schedulers run on one engine and the same prompts (sample i of prompt uid always gets the
same length), interleaved step by step, after warm-up steps. The no-tail bound replays the
workload with every length equal to the mean: raw `generate` (no streaming, no scheduler)
against APRIL.

    python bench/april_throughput.py                       # defaults, ~3-6 min on 2 CPU cores
    python bench/april_throughput.py --dist pareto --steps 20
    python bench/april_throughput.py --lengths-file lengths.txt --out /tmp/r.json

Writes bench/results/april_throughput.json (or --out) with `speedup` (APRIL over synchronous
useful tokens/s) and `no_tail_ratio` (APRIL over raw generate on the no-tail workload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

DEFAULT_OUT = Path(__file__).parent / "results" / "april_throughput.json"


# ---- workload ----------------------------------------------------------------------------------


def length_sampler(args) -> "callable":
    """(uid, index) -> response length, deterministic, clamped to [1, max_len]."""
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
        r = random.Random(f"{args.seed}:{uid}:{i}")
        return max(1, min(mx, round(draw(r))))
    return length


def profile_stats(length, n: int = 20000) -> dict:
    xs = sorted(length(10**7 + k // 64, k % 64) for k in range(n))
    pct = lambda q: xs[min(n - 1, int(q * n))]  # noqa: E731
    return {"mean": sum(xs) / n, "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "max": xs[-1], "frac_over_10x_median": sum(x > 10 * pct(0.5) for x in xs) / n}


class Prompts:
    """Arithmetic questions with uids 0, 1, ...; both schedulers see the same sequence."""

    def __init__(self, tokenizer, seed: int):
        from rollover.tasks.arithmetic import arithmetic_record

        self.record, self.tokenizer, self.seed, self.uid = arithmetic_record, tokenizer, seed, 0

    def __call__(self):
        uid, self.uid = self.uid, self.uid + 1
        rec = self.record(self.seed, uid, 1, 3, 2, True)
        return uid, rec, self.tokenizer.encode(rec["question"])


def no_score(group) -> None:
    for s in group.samples:
        s.reward = 0.0


# ---- runs --------------------------------------------------------------------------------------


def make_scheduler(engine, tokenizer, args, over_provision: float, partial: bool, length):
    from rollover.rollout.april import STREAM_INTERVAL, AprilScheduler
    from rollover.rollout.engine import SamplingSettings

    cfg = SimpleNamespace(groups_per_step=args.groups, group_size=args.group_size,
                          over_provision=over_provision, partial=partial, max_staleness=10**6,
                          max_tokens=args.max_len, temperature=1.0, top_p=1.0)
    return AprilScheduler(engine, cfg, Prompts(tokenizer, args.seed), no_score,
                          sampling=SamplingSettings(temperature=1.0, ignore_eos=True,
                                                    stream_interval=STREAM_INTERVAL),
                          budget_fn=lambda g, i: length(g.uid, i))


KEEP = ("rollout/wall_s", "rollout/useful_tokens", "rollout/generated_tokens",
        "rollout/requests_aborted", "rollout/buffer_size", "rollout/groups_resumed")


def summary(steps: list[dict]) -> dict:
    wall = sum(s["rollout/wall_s"] for s in steps)
    useful = sum(s["rollout/useful_tokens"] for s in steps)
    gen = sum(s["rollout/generated_tokens"] for s in steps)
    return {"useful_tokens_per_s": useful / wall, "generated_tokens_per_s": gen / wall,
            "wall_s": wall, "useful_tokens": useful, "generated_tokens": gen,
            "steps": [{k.split("/")[1]: s[k] for k in KEEP} for s in steps]}


async def raw_generate_step(engine, n_requests: int, length: int, prompts) -> dict:
    """One batch of plain requests, all submitted at once, FINAL_ONLY (no streaming)."""
    from rollover.rollout.engine import SamplingSettings

    sampling = SamplingSettings(temperature=1.0, ignore_eos=True)
    batch = [prompts()[2] for _ in range(n_requests)]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(p, length, sampling) for p in batch))
    wall = time.perf_counter() - t0
    toks = sum(len(o.token_ids) for o in outs)
    return {"rollout/wall_s": wall, "rollout/useful_tokens": toks, "rollout/generated_tokens": toks,
            "rollout/requests_aborted": 0, "rollout/buffer_size": 0, "rollout/groups_resumed": 0}


async def interleaved(runners: dict, warmup: int, steps: int, log) -> dict:
    """Step every runner in turn; keep the metrics of the steps after warm-up."""
    kept = {name: [] for name in runners}
    for k in range(warmup + steps):
        for name, step in runners.items():
            m = await step()
            if k >= warmup:
                kept[name].append(m)
            log(f"  step {k:2d} {name:12s} {m['rollout/useful_tokens'] / m['rollout/wall_s']:8.0f} "
                f"useful tok/s  ({m['rollout/wall_s']:.2f} s{'' if k >= warmup else ', warm-up'})")
    return {name: summary(ms) for name, ms in kept.items()}


async def bench(engine, tokenizer, args, log) -> dict:
    long_len = length_sampler(args)
    stats = profile_stats(long_len)
    mean_len = max(1, round(stats["mean"]))
    flat_len = lambda uid, i: mean_len  # noqa: E731
    sync = make_scheduler(engine, tokenizer, args, 1.0, False, long_len)
    april = make_scheduler(engine, tokenizer, args, args.over_provision, True, long_len)
    log(f"long-tail workload {stats}")
    tail = await interleaved({"sync": lambda: _metrics(sync), "april": lambda: _metrics(april)},
                             args.warmup, args.steps, log)
    april_flat = make_scheduler(engine, tokenizer, args, args.over_provision, True, flat_len)
    raw_prompts = Prompts(tokenizer, args.seed + 1)
    n_sync = args.groups * args.group_size
    n_april = math.ceil(args.over_provision * args.groups) * args.group_size
    log(f"no-tail workload: every length {mean_len}")
    flat = await interleaved({
        "raw_generate": lambda: raw_generate_step(engine, n_sync, mean_len, raw_prompts),
        f"raw_generate_x{args.over_provision:g}": lambda: raw_generate_step(engine, n_april, mean_len, raw_prompts),
        "april": lambda: _metrics(april_flat),
    }, args.warmup, args.steps, log)
    for s in (sync, april, april_flat):
        s.close()
    raw_best = max(v["useful_tokens_per_s"] for k, v in flat.items() if k.startswith("raw"))
    return {
        "speedup": tail["april"]["useful_tokens_per_s"] / tail["sync"]["useful_tokens_per_s"],
        "no_tail_ratio": flat["april"]["useful_tokens_per_s"] / raw_best,
        "no_tail_ratio_vs_same_batch": flat["april"]["useful_tokens_per_s"]
        / flat["raw_generate"]["useful_tokens_per_s"],
        "long_tail": {"workload": stats, **tail},
        "no_tail": {"workload": {"length": mean_len}, **flat},
    }


async def _metrics(scheduler) -> dict:
    return (await scheduler.step()).metrics


# ---- entry point -------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    import torch
    import vllm

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu or platform.processor(), "cpu_count": os.cpu_count(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm.__version__, "git_commit": commit,
            "load_avg_start": os.getloadavg()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dist", default="lognormal",
                   choices=["lognormal", "pareto", "exponential", "uniform", "constant"])
    p.add_argument("--lengths-file", help="one response length per line, replayed in order")
    p.add_argument("--median", type=int, default=32, help="median response length (tokens)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma")
    p.add_argument("--alpha", type=float, default=1.5, help="Pareto shape")
    p.add_argument("--max-len", type=int, default=448, help="length cap (context is 512)")
    p.add_argument("--groups", type=int, default=8, help="N groups per step")
    p.add_argument("--group-size", type=int, default=8, help="G samples per group")
    p.add_argument("--over-provision", type=float, default=2.0, help="N'/N for APRIL")
    p.add_argument("--steps", type=int, default=30, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="builtin:tiny-math")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from rollover.rollout.engine import EngineSettings, RolloutEngine
    from rollover.trainer.builtin_model import resolve_model_path

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    started = time.perf_counter()
    info = machine_info()
    engine = RolloutEngine(EngineSettings(model=resolve_model_path(args.model), max_model_len=512,
                                          seed=args.seed, enable_prefix_caching=True))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    engine.start()
    try:
        result = loop.run_until_complete(bench(engine, engine.llm.get_tokenizer(), args, log))
    finally:
        engine.shutdown()
    info["load_avg_end"] = os.getloadavg()
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["machine"] = info
    result["bench_wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"speedup {result['speedup']:.2f}x  no_tail_ratio {result['no_tail_ratio']:.2f}  -> {args.out}")
    return result


if __name__ == "__main__":
    main()
