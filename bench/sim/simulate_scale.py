"""APRIL at scale, simulated: the real scheduler and engine pool over up to 256 simulated engines.

The real `AprilScheduler` and the real `EnginePool` drive `SimEngine`s (bench/sim/sim_engine.py) on a
virtual clock, so hours of simulated rollout cost minutes. Each RL step is what training does:
`sched.step()`, a simulated train step (`--train-s`), then `pool.wait_idle()` and
`pool.update_weights(...)` (the version goes up every step, so buffered groups age and are
dropped past `max_staleness`). The engines are calibrated on this repository's measured CPU
figures (bench/results/*.json, see `calibrate`): a decode iteration costs
`base + per_seq * running requests`, a weight load `sync_s`, a train step `train_s`; a resumed
sample's context costs a prefill per token fitted so that one simulated engine's APRIL steps last
as long as the measured ones (the synchronous steps, which resume nothing, are the check).

Workload: `april_throughput.py`'s long-tailed length distribution (imported, same options and
defaults: log-normal, median 32, sigma 1, cap 448), N = `--groups-per-engine` x engines groups of
G = 8 per step. By default the router does not know the lengths (every sample's budget is
`--max-len`, the engine stops it where the profile says, as EOS would); `--lengths-known` gives
every sample its exact budget, as april_throughput.py does.

Modes (all through the same scheduler code):
  sync          over_provision 1, partial off: the synchronous baseline;
  april         over_provision `--over-provision`, partial on, buffered groups resume on the
                least-loaded engine (the pool's routing: migration at step boundaries);
  april_sticky  the same, but a group always resumes on the engine it first ran on (a pool
                subclass here: the product pool is not changed).
Engine settings: `homogeneous`, and `hetero` (`--slow-fraction` of the engines `--slowdown`x
slower: the engines that make the long tail longer).

Per run: useful tokens per virtual second of rollout + train + sync, staleness waste (generated
tokens never trained on / generated), engine busy fraction during rollout, and the per-engine
queue when the step stops (true outstanding tokens when the N-th group finished and the rest was
aborted): mean, max, and max/mean.

    python -m bench.sim.simulate_scale               # every engine count: ~30 min of CPU here
    python -m bench.sim.simulate_scale --quick       # 1 and 8 engines, a few steps (seconds)
    python -m bench.sim.simulate_scale --engines 64 --modes sync,april --out /tmp/s.json
    python -m bench.sim.simulate_scale --merge part1.json part2.json ... --out result.json

The simulation's own CPU grows faster than linearly with engines (the engines themselves, the
pool's routing over every engine per group, and the garbage collector walking a heap that grows
with them; the scheduler's own share is linear since issue 26, see bench/sim/scheduler_cpu.py),
so a full sweep is best run in parts (one engine count or mode each) and merged; every part
records its config.
Writes bench/results/scaling_sim.json (or --out).

This sweep steps synchronously (rollout, train, load). The pipelined loop (`rollout.max_async`
1 and 2, the product's `RolloutAhead`), a GPU calibration from published figures and 1,024
engines are bench/sim/pipeline_sweep.py's (section `pipeline` of the same file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import functools
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.april.april_steps import SchedulerMode
from bench.april.april_throughput import add_workload_args, length_sampler, profile_stats, recipe_max_staleness
from bench.common import RESULTS, machine, save_json
from bench.sim.sim_calibrate import PROMPT_LEN, calibrate, costs_of
from bench.sim.sim_engine import SimCosts, SimEngine, run_virtual, run_as_driver
from bench.sim.sim_report import merge, summarize_run, summary
from rollover.rollout.april import STREAM_INTERVAL, AprilScheduler
from rollover.rollout.cpu_clock import CpuClock
from rollover.rollout.pool import EnginePool, Lease
from rollover.rollout.settings import SamplingSettings

DEFAULT_OUT = RESULTS / "scaling_sim.json"
MODES = ("sync", "april", "april_sticky")


# ---- calibration -----------------------------------------------------------------------------


def fit_resume_prefill(args: argparse.Namespace, cal: dict[str, Any], train_s: float) -> float:
    """The prefill cost per resumed context token that makes one simulated engine's APRIL steps
    as long as the measured ones (bisection). It stands for everything the decode model leaves
    out of APRIL on the real engine: re-prefilling resumed samples after the cache reset, and
    the scheduler's own CPU on the 2-core machine."""
    target = cal["measured_long_tail_rollout_s_per_step"]["april_s4"]
    lo, hi = 0.0, 4 * cal["decode"]["per_seq_s"]
    if one_engine(args, costs_of(cal, args, 0.0), cal, "april", train_s) >= target:
        return 0.0
    for _ in range(12):
        mid = (lo + hi) / 2
        if one_engine(args, costs_of(cal, args, mid), cal, "april", train_s) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---- pools ---------------------------------------------------------------------------------------

CURRENT_GROUP: contextvars.ContextVar[int | None] = contextvars.ContextVar("current_group", default=None)


class MeasuredPool(EnginePool):
    """The product pool, plus a snapshot of every engine's queue when the step stops, and a
    count of group runs that went to another engine than their previous run (migrations)."""

    stop_queue: list[int] | None = None  # true outstanding tokens per engine at the step's abort
    stop_leases: list[int] | None = None  # the pool's own view (leased budgets) at that moment

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.last: dict[int, Any] = {}  # group uid -> the member its last run went to
        self.moved = 0

    def route(self, tokens: int = 0) -> Lease:
        uid = CURRENT_GROUP.get()
        lease = self.choose(uid, tokens)
        if uid is not None:
            if self.last.get(uid, lease.member) is not lease.member:
                self.moved += 1
            self.last[uid] = lease.member
        return lease

    def choose(self, uid: int | None, tokens: int) -> Lease:
        return super().route(tokens)  # the product's routing: least outstanding tokens

    def decode(self, token_ids: list[int]) -> str:
        # The product pool decodes on its least-loaded live engine: an O(engines) search per
        # sample, which dominates the simulation's own CPU at 256 engines; every SimEngine
        # decodes alike, so the first one serves (this changes no virtual time).
        return self.members[0].engine.decode(token_ids)

    async def abort(self, request_ids):
        if self.stop_queue is None:
            self.stop_queue = [outstanding(m.engine) for m in self.members]
            self.stop_leases = self.load()
        return await super().abort(request_ids)


class StickyPool(MeasuredPool):
    """A group resumes on the engine it first ran on (while that engine lives): no migration."""

    def choose(self, uid: int | None, tokens: int) -> Lease:
        home = self.last.get(uid)
        if home is not None and home.alive:
            return Lease(home, tokens)
        return super().choose(uid, tokens)


def track_groups(sched: AprilScheduler) -> None:
    """Every group run's task knows its group uid (for `MeasuredPool.route`)."""
    run = sched.runner.run

    async def tracked(group_run, counters):
        CURRENT_GROUP.set(group_run.group.uid)
        return await run(group_run, counters)

    sched.runner.run = tracked


def measure_steps(sched: Any) -> CpuClock:
    """Every `sched.step()` from now on runs under the returned clock (its own CPU, see
    rollout/cpu_clock.py): one definition for any scheduler, old or new."""
    clock, step = CpuClock(), sched.step

    async def measured(*args: Any, **kw: Any) -> Any:
        return await clock.measure(step(*args, **kw))

    sched.step = measured
    return clock


def outstanding(engine: SimEngine) -> int:
    """Tokens the engine still has to generate for its open requests (what it really holds)."""
    return engine.outstanding()


# ---- one simulated run -----------------------------------------------------------------------------


class Prompts:
    """uids 0, 1, ...; every prompt is PROMPT_LEN tokens."""

    def __init__(self) -> None:
        self.uid = 0

    def __call__(self) -> tuple[int, dict, list[int]]:
        uid, self.uid = self.uid, self.uid + 1
        return uid, {"uid": uid}, [1] * PROMPT_LEN


async def no_score(group) -> None:
    """Async, so no scoring thread runs (the virtual clock does not wait for threads)."""
    for s in group.samples:
        s.reward = 0.0


def profile_stop(length):
    """`stop_at` for SimEngine: the tokens a request may still produce before its profile length."""
    def stop_at(request_id: str, prompt_ids: list[int]) -> int:
        _, g, s, _ = request_id.split("-")
        return length(int(g[1:]), int(s[1:])) - (len(prompt_ids) - PROMPT_LEN)
    return stop_at


def n_slow(engines: int, fraction: float) -> int:
    if engines < 2 or fraction <= 0:
        return 0
    return max(1, round(fraction * engines))


async def simulate(args: argparse.Namespace, costs: SimCosts, *, engines: int, mode: str,
                   hetero: bool, train_s: float, deaths: int = 0, die_at: float | None = None,
                   revive_s: float | None = None, on_step=None,
                   scheduler_cls: type = AprilScheduler) -> dict[str, Any]:
    """`args.warmup + args.steps` RL steps of one mode on `engines` simulated engines;
    `on_step(scheduler, pool, record)` is called after each step's rollout. `scheduler_cls`
    stands in for `AprilScheduler` (bench/sim/scheduler_cpu.py runs an older one beside it).

    Every step record has the scheduler's own CPU seconds as `CpuClock` measures them from
    outside (`scheduler_task_cpu_s`, the same for any scheduler class; the garbage collector's
    runs in those stretches apart, `scheduler_task_gc_s`), the scheduler's metric
    (`scheduler_cpu_s`, None for a scheduler without it) and the event loop thread's CPU over
    the rollout (`loop_cpu_s`: the scheduler, the group runs, the pool and the simulated engines)."""
    loop = asyncio.get_running_loop()
    length = functools.lru_cache(maxsize=None)(length_sampler(args, args.seed))
    stop_at = None if args.lengths_known else profile_stop(length)
    slow = set(range(engines - n_slow(engines, args.slow_fraction if hetero else 0), engines))

    def make(i: int, die: float | None = None) -> SimEngine:
        return SimEngine(i, costs, slowdown=args.slowdown if i in slow else 1.0,
                         max_batch=args.max_batch, chunk=args.chunk, quantum=args.quantum,
                         max_model_len=args.max_model_len,
                         stop_at=stop_at, die_at=die)

    sims = [make(i, die_at if i < deaths else None) for i in range(engines)]
    replace = None
    if revive_s is not None:
        async def replace(index: int) -> SimEngine:
            await asyncio.sleep(revive_s)
            engine = make(index)
            sims.append(engine)
            return engine

    pool = (StickyPool if mode == "april_sticky" else MeasuredPool)(sims, replace=replace)
    april = mode != "sync"
    cfg = SimpleNamespace(groups_per_step=args.groups_per_engine * engines, group_size=args.group_size,
                          over_provision=args.over_provision if april else 1.0, partial=april,
                          max_staleness=args.max_staleness, max_tokens=args.max_len,
                          temperature=1.0, top_p=1.0)
    sched = scheduler_cls(pool, cfg, Prompts(), no_score,
                           sampling=SamplingSettings(temperature=1.0, ignore_eos=args.lengths_known,
                                                     stream_interval=STREAM_INTERVAL),
                           budget_fn=(lambda g, i: length(g.uid, i)) if args.lengths_known else None)
    track_groups(sched)
    clock = measure_steps(sched)
    stepper = SchedulerMode(sched)
    records = []
    real_started = time.perf_counter()
    try:
        for k in range(args.warmup + args.steps):
            pool.stop_queue = pool.stop_leases = None
            live = [m.engine for m in pool.members]
            t0, real0, moved0 = loop.time(), time.perf_counter(), pool.moved
            busy0 = [e.busy_at(t0) for e in live]
            cpu0, gc0, loop_cpu0 = clock.seconds, clock.gc_seconds, time.thread_time()
            rec = await stepper.rollout()
            t1 = loop.time()
            rec.update(scheduler_task_cpu_s=clock.seconds - cpu0, scheduler_task_gc_s=clock.gc_seconds - gc0,
                       loop_cpu_s=time.thread_time() - loop_cpu0,
                       scheduler_cpu_s=sched.last_metrics.get("rollout/scheduler_cpu_s"))
            if on_step is not None:
                on_step(sched, pool, rec)
            busy = [(e.busy_at(t1) - b) / (t1 - t0) for e, b in zip(live, busy0)] if t1 > t0 else []
            if len(rec["lengths"]) != cfg.groups_per_step * cfg.group_size:
                raise RuntimeError(f"step {k}: {rec['groups_returned']} groups returned, "
                                   f"{cfg.groups_per_step} asked for")
            sched.check_conservation()
            await asyncio.sleep(train_s)
            t2 = loop.time()
            await pool.wait_idle()
            await pool.update_weights({})
            t3 = loop.time()
            rollout_s = t1 - t0
            queue = pool.stop_queue or [0] * len(pool.members)
            alive = [i for i, m in enumerate(pool.members) if m.alive]
            q = [queue[i] for i in alive]
            rec.pop("lengths")
            rec.update(
                step=k, warmup=k < args.warmup, rollout_real_s=time.perf_counter() - real0,
                rollout_s=rollout_s, train_s=t2 - t1, sync_s=t3 - t2, step_s=t3 - t0,
                queue_mean=statistics.mean(q) if q else 0.0, queue_max=max(q, default=0),
                queue_slow_mean=statistics.mean([queue[i] for i in alive if i in slow]) if slow else None,
                lease_mean=statistics.mean(pool.stop_leases) if pool.stop_leases else 0.0,
                busy_mean=statistics.mean(busy) if busy else 0.0, busy_min=min(busy, default=0.0),
                migrations=sched.last_metrics.get("rollout/migrations", 0),
                groups_moved=pool.moved - moved0,
                engines_live=len(pool.live))
            records.append(rec)
    finally:
        sched.close()
        pool.shutdown()
    return {"engines": engines, "mode": mode, "hetero": hetero, "slow_engines": len(slow),
            "groups_per_step": cfg.groups_per_step, "in_flight_groups": sched.n_in_flight,
            "deaths": deaths, "real_s": time.perf_counter() - real_started,
            **summarize_run([r for r in records if not r["warmup"]]), "steps": records}


# ---- the sweep ---------------------------------------------------------------------------------


def one_engine(args: argparse.Namespace, costs: SimCosts, cal: dict[str, Any], mode: str,
               train_s: float) -> float:
    """Rollout seconds per step of one simulated engine on the measured workload (8 x 8, exact
    budgets, 3 warm-up + 10 steps), to set beside the measured figure."""
    m = cal["measured_config"]
    vargs = argparse.Namespace(**{**vars(args), "groups_per_engine": m["groups"],
                                  "group_size": m["group_size"],
                                  "over_provision": m["over_provision"], "lengths_known": True,
                                  "median": m["median"], "sigma": m["sigma"], "max_len": m["max_len"],
                                  "dist": m["dist"], "warmup": 3, "steps": 10, "quantum": 0.0})
    r = run_virtual(simulate(vargs, costs, engines=1, mode=mode, hetero=False, train_s=train_s))
    return r["rollout_s_per_step"]


def validation(args: argparse.Namespace, costs: SimCosts, cal: dict[str, Any], train_s: float) -> dict:
    """One simulated engine vs the measured steps, with the costs used and with no prefill."""
    bare = dataclasses.replace(costs, prefill_per_token_s=0.0)
    return {mode: {"measured_rollout_s_per_step": cal["measured_long_tail_rollout_s_per_step"][measured],
                   "simulated_rollout_s_per_step": one_engine(args, costs, cal, mode, train_s),
                   "simulated_no_prefill": one_engine(args, bare, cal, mode, train_s)}
            for mode, measured in (("sync", "sync"), ("april", "april_s4"))}


def sweep(args: argparse.Namespace, log=print) -> dict[str, Any]:
    cal = calibrate(args.results)
    train_s = args.train_s if args.train_s is not None else cal["train_s"]
    if args.prefill_per_token_s is None:
        cal["resume_prefill_per_token_s"] = fit_resume_prefill(args, cal, train_s)
        cal["sources"]["resume_prefill_per_token_s"] = (
            "fitted: one simulated engine's APRIL (max_staleness 4) rollout s/step = "
            "april_throughput.json's april_s4 median; charged per resumed context token")
    costs = costs_of(cal, args)
    started = time.perf_counter()
    info = machine()
    runs = []
    for hetero in args.hetero:
        for engines in args.engines:
            for mode in args.modes:
                if mode == "april_sticky" and engines == 1:
                    continue  # one engine: nowhere to migrate to
                r = run_virtual(simulate(args, costs, engines=engines, mode=mode, hetero=hetero,
                                         train_s=train_s))
                r["variant"] = args.variant
                runs.append(r)
                log(f"{'hetero' if hetero else 'homog.'} {engines:4d} engines {mode:13s} "
                    f"{r['useful_tokens_per_s']:10.0f} useful tok/s  "
                    f"waste {100 * r['waste_fraction']:5.1f}%  "
                    f"rollout {r['rollout_s_per_step']:.3f} s/step  busy {r['engine_busy_mean']:.2f}  "
                    f"queue max/mean {r['queue_max_over_mean'] or 0:.2f}  ({r['real_s']:.1f} s real)")
    if args.deaths:
        for mode in ("april", "april_sticky"):
            r = run_virtual(simulate(args, costs, engines=max(args.engines), mode=mode, hetero=False,
                                     train_s=train_s, deaths=args.deaths, die_at=args.die_at,
                                     revive_s=args.revive_s))
            r["death_run"] = True
            runs.append(r)
            log(f"deaths {args.deaths} at {args.die_at} s, {max(args.engines)} engines {mode}: "
                f"{r['useful_tokens_per_s']:.0f} useful tok/s, {r['migrations']} migrations")
    result = {
        "benchmark": "APRIL scaling, simulated engines on a virtual clock (real scheduler and pool)",
        "calibration": {**cal, "used": {"base_s": costs.base_s, "per_seq_s": costs.per_seq_s,
                                        "sync_s": costs.sync_s, "train_s": train_s,
                                        "prefill_per_token_s": costs.prefill_per_token_s}},
        "workload": {"long_tail": profile_stats(length_sampler(args, args.seed)),
                     "lengths_known_to_router": args.lengths_known},
        "summary": summary(runs),
        "runs": runs,
    }
    if args.validate:
        result["validation_one_engine"] = validation(args, costs, cal, train_s)
    info["load_avg_end"] = list(os.getloadavg())
    result["machine"] = info
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["sim_wall_s"] = time.perf_counter() - started
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)  # --dist --median --sigma --max-len ... (april_throughput.py's workload)
    p.add_argument("--engines", default="1,8,32,64,128,256", help="engine counts, comma-separated")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--hetero-settings", dest="hetero", default="homogeneous,hetero",
                   help="homogeneous and/or hetero, comma-separated")
    p.add_argument("--groups-per-engine", type=int, default=8, help="N = this x engines")
    p.add_argument("--over-provision", type=float, default=2.0)
    p.add_argument("--max-staleness", type=int, default=None, help="default: the recipe default")
    p.add_argument("--lengths-known", action="store_true",
                   help="exact per-sample budgets (the router sees true lengths), as april_throughput.py")
    p.add_argument("--slow-fraction", type=float, default=0.1)
    p.add_argument("--slowdown", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=256,
                   help="running requests per engine (vLLM max_num_seqs)")
    p.add_argument("--chunk", type=int, default=16, help="decode iterations per delivered chunk")
    p.add_argument("--quantum", type=float, default=0.005,
                   help="virtual seconds between token deliveries (0: exact; the engines compute "
                        "on regardless, only the scheduler hears of tokens on this grid)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--train-s", type=float, default=None, help="default: calibrated")
    p.add_argument("--sync-s", type=float, default=None, help="default: calibrated")
    p.add_argument("--prefill-per-token-s", type=float, default=None,
                   help="prefill cost per resumed context token (beyond the prompt, whose prefill is "
                        "inside the decode costs); default: fitted to the measured APRIL steps")
    p.add_argument("--steps", type=int, default=12, help="measured RL steps per run")
    p.add_argument("--warmup", type=int, default=4, help="warm-up RL steps per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deaths", type=int, default=0, help="engines that die at --die-at (largest count)")
    p.add_argument("--die-at", type=float, default=20.0, help="virtual second of the deaths")
    p.add_argument("--revive-s", type=float, default=None, help="replace dead engines after this long")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the one-engine check against the measured steps")
    p.add_argument("--quick", action="store_true", help="1 and 8 engines, 2+3 steps (tests)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the measured figures are")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--variant", default="",
                   help="a name for a sensitivity run (its runs get their own rows in the summary)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="combine the results of several invocations into --out, and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.engines, args.steps, args.warmup = "1,8", 3, 2
    args.engines = [int(x) for x in str(args.engines).split(",") if x.strip()]
    args.modes = [m for m in args.modes.split(",") if m.strip()]
    args.hetero = [h.strip() == "hetero" for h in args.hetero.split(",") if h.strip()]
    if set(args.modes) - set(MODES):
        p.error(f"modes are {', '.join(MODES)}")
    if args.max_staleness is None:
        args.max_staleness = recipe_max_staleness()
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        result = merge(args.merge)
    else:
        result = sweep(args, log=lambda msg: print(msg, flush=True))
    save_json(result, args.out)
    for key, value in result["summary"].items():
        if key.startswith("headline"):
            print(f"{key}: " + ", ".join(f"{k} {v:.2f}" for k, v in value.items() if isinstance(v, float)))
    print(f"{result['sim_wall_s']:.0f} s real -> {args.out}", flush=True)
    return result


if __name__ == "__main__":
    run_as_driver(main)
