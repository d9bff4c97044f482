"""The product's training loop shape over simulated engines: the real `RolloutAhead`
(rollout/pipeline.py), `AprilScheduler` and `EnginePool`, and a simulated trainer.

One run is what `trainer/loop.py`'s `Trainer.train_step` does, step after step, on a virtual
clock (bench/sim/sim_engine.py): `ahead.next_batch()`, the batch's token ages checked against
`max_staleness` (as the trainer checks them), the update (`train_s` virtual seconds; with
`max_async > 0` the producer keeps the engines generating meanwhile, as the update's worker thread
lets the event loop do), then `ahead.load_weights(...)` (interrupt the running step, wait for
idle, load: `sync_s` on every engine). Only the update and the weights are simulated: batching,
running ahead, interrupts, buffering and staleness drops are the product's code.

Modes (`MODES`): `sync` (over-provision 1, partial off, max_async 0), `april` (max_async 0),
`april_pipe1`, `april_pipe2` (APRIL with rollout.max_async 1 and 2).

Per run: useful (trained) tokens per virtual second, the trained tokens' version lag at the
moment they are trained (max and mean, per token), engine busy (computing) and trainer busy
fractions over the measured steps, and the scheduler's own CPU per step (its metric
`rollout/scheduler_cpu_s`, real seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

from bench.april.april_throughput import length_sampler
from bench.sim.sim_calibrate import PROMPT_LEN
from bench.sim.sim_engine import SimCosts, SimEngine
from bench.sim.simulate_scale import MeasuredPool, Prompts, no_score, profile_stop
from rollover.rollout.april import STREAM_INTERVAL, AprilScheduler
from rollover.rollout.pipeline import RolloutAhead
from rollover.rollout.settings import SamplingSettings

MODES: dict[str, tuple[bool, int]] = {  # name -> (APRIL on, rollout.max_async)
    "sync": (False, 0), "april": (True, 0), "april_pipe1": (True, 1), "april_pipe2": (True, 2)}


class StaleTokenTrained(RuntimeError):
    """A batch handed to the trainer holds a token older than max_staleness: a scheduler bug."""


@dataclass
class Profile:
    """A calibration: engine costs, the trainer's step, and the workload in simulated tokens."""

    name: str
    costs: SimCosts
    train_s: float
    block: int = 1  # real tokens per simulated token (token counts are reported x block)
    median: float = 32
    sigma: float = 1.0
    max_len: int = 448
    group_size: int = 8
    chunk: int = 16  # iterations per delivered chunk
    quantum: float = 0.005  # virtual seconds between deliveries
    max_batch: int = 256
    sources: dict[str, Any] = field(default_factory=dict)

    def lengths(self, seed: int) -> Callable[[int, int], int]:
        ns = argparse.Namespace(lengths_file=None, dist="lognormal", median=self.median, sigma=self.sigma,
                                alpha=1.5, max_len=self.max_len, group_size=self.group_size)
        return functools.lru_cache(maxsize=None)(length_sampler(ns, seed))


def token_lags(groups: list, version: int) -> tuple[int, int, int]:
    """(max lag, sum of lags, tokens) of every response token against `version`."""
    worst = total = n = 0
    for g in groups:
        for s in g.samples:
            for v in s.versions:
                lag = version - v
                worst = max(worst, lag)
                total += lag
            n += len(s.versions)
    return worst, total, n


async def simulate_pipeline(profile: Profile, *, engines: int, mode: str, groups_per_engine: int = 4,
                            over_provision: float = 2.0, max_staleness: int = 4, warmup: int = 2,
                            steps: int = 4, seed: int = 0, on_batch: Callable | None = None) -> dict[str, Any]:
    """`warmup + steps` trainer steps of `mode` on `engines` simulated engines; the figures are
    over the last `steps`. `on_batch(result, version)` sees every batch the trainer takes."""
    april, max_async = MODES[mode]
    loop = asyncio.get_running_loop()
    length = profile.lengths(seed)
    sims = [SimEngine(i, profile.costs, max_batch=profile.max_batch, chunk=profile.chunk,
                      quantum=profile.quantum, max_model_len=PROMPT_LEN + profile.max_len,
                      stop_at=profile_stop(length)) for i in range(engines)]
    pool = MeasuredPool(sims)
    cfg = SimpleNamespace(groups_per_step=groups_per_engine * engines, group_size=profile.group_size,
                          over_provision=over_provision if april else 1.0, partial=april,
                          max_staleness=max_staleness, max_tokens=profile.max_len, temperature=1.0, top_p=1.0)
    sched = AprilScheduler(pool, cfg, Prompts(), no_score,
                           sampling=SamplingSettings(temperature=1.0, stream_interval=STREAM_INTERVAL))
    ahead = RolloutAhead(sched, max_async)

    async def run_load(load):  # the trainer's CheckedWeightSync, less the log-prob probe
        return await load()

    def mark() -> tuple[float, float, int]:
        now = loop.time()
        return now, sum(e.busy_at(now) for e in sims), sum(e.tokens for e in sims)

    real0 = time.perf_counter()
    start = mark()
    worst = lag_sum = lag_n = useful = 0
    waits, cpu, drops, interrupts = [], [], 0, 0
    try:
        for k in range(warmup + steps):
            if k == warmup:
                start = mark()
            t0 = loop.time()
            result = await ahead.next_batch()
            waited = loop.time() - t0
            version = pool.policy_version  # what the update trains at, as trainer/loop.py reads it
            step_worst, step_sum, step_n = token_lags(result.groups, version)
            if step_worst > max_staleness:
                raise StaleTokenTrained(f"{mode}, {engines} engines, step {k}: a token {step_worst} "
                                        f"versions old (max_staleness {max_staleness})")
            if on_batch is not None:
                on_batch(result, version)
            if k >= warmup:
                worst, lag_sum, lag_n = max(worst, step_worst), lag_sum + step_sum, lag_n + step_n
                useful += step_n
                waits.append(waited)
                cpu.append(result.metrics["rollout/scheduler_cpu_s"])
                drops += result.metrics.get("rollout/staleness_drops", 0)
                interrupts += result.metrics.get("rollout/interrupts", 0)
            await asyncio.sleep(profile.train_s)  # the update (a worker thread in the trainer)
            await ahead.load_weights({}, run_load)
        end = mark()
        await ahead.settle()
    finally:
        sched.close()
        pool.shutdown()
    wall = end[0] - start[0]
    b = profile.block
    return {
        "profile": profile.name, "engines": engines, "mode": mode, "max_async": max_async,
        "groups_per_step": cfg.groups_per_step, "in_flight_groups": sched.n_in_flight,
        "measured_steps": steps, "warmup_steps": warmup,
        "useful_tokens_per_s": useful * b / wall,
        "seconds_per_step": wall / steps,
        "trainer_wait_s_per_step": statistics.mean(waits),
        "token_lag_max": worst, "token_lag_mean": lag_sum / lag_n if lag_n else 0.0,
        "max_staleness": max_staleness,
        "engine_busy": (end[1] - start[1]) / (engines * wall),
        "trainer_busy": profile.train_s * steps / wall,
        "generated_per_useful": (end[2] - start[2]) / useful if useful else None,
        "staleness_drops_per_step": drops / steps, "interrupts_per_step": interrupts / steps,
        "scheduler_cpu_s_per_step": statistics.median(cpu),
        "real_s": time.perf_counter() - real0,
    }
