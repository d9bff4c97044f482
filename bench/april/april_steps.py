"""Measured steps for `april_throughput.py`: each mode's step ends as a training step does.

A training step is rollout, then (after the update) `wait_idle` + `update_weights`, which loads
the weights, resets the prefix cache and bumps the policy version. The benchmark has no update,
so it pushes the unchanged weights through the real `update_weights` after every step of every
mode and times it as the step's weight sync.

All modes share one engine and step in turn (round k: every mode's k-th step), so every mode runs
round k at the same policy version and the version goes up once per round: a mode sees exactly
one bump between two of its steps, as in training, and the others' weight loads in between
change nothing it can see (same weights; the cache is reset after every step anyway).

Wasted tokens are counted from what `step()` exposes: the buffer's tokens before and after the
step, the generated and returned tokens, and the ledger's verdict on the groups that were
buffered. Conservation gives the rest: buffered before + generated = returned + buffered after
+ dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Protocol

TOKEN_KEYS = ("useful_tokens", "generated_tokens", "stale_tokens", "unfinished_tokens")


class Mode(Protocol):
    async def rollout(self) -> dict[str, Any]:
        """One rollout; returns a step record (see `SchedulerMode.rollout`) with `lengths`."""

    def close(self) -> None:
        """Release what the mode holds."""


def buffer_tokens(scheduler: Any) -> dict[int, int]:
    """uid -> response tokens already generated, for every buffered group."""
    return {g.uid: sum(len(s.response_ids) for s in g.samples) for g in scheduler.buffer.groups()}


class SchedulerMode:
    """An `AprilScheduler` (APRIL or synchronous), stepped and accounted for.

    A filter installed with `filter_by(reject)` rejects the groups `reject(group)` names; their
    tokens are counted apart as filtered (a resumed group may be filtered, not only dropped stale).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.rejected: dict[int, int] = {}  # uid -> tokens of the groups filtered this step

    def filter_by(self, reject: Any) -> None:
        def keep(group: Any) -> bool:
            if reject(group):
                self.rejected[group.uid] = sum(len(s.response_ids) for s in group.samples)
                return False
            return True

        self.scheduler.group_filter = keep

    async def rollout(self) -> dict[str, Any]:
        from rollover.rollout.ledger import DROPPED

        s, self.rejected = self.scheduler, {}
        before = buffer_tokens(s)
        started = time.perf_counter()
        result = await s.step()
        rollout_s = time.perf_counter() - started
        after = buffer_tokens(s)
        m = result.metrics
        lengths = [len(x.response_ids) for g in result.groups for x in g.samples]
        # Stale drops happen at step start, before any generation: a buffered group the ledger
        # now calls dropped, and the filter did not reject, left with exactly the tokens it had.
        stale_uids = [u for u in before if s.ledger.place(u) == DROPPED and u not in self.rejected]
        if len(stale_uids) != m["rollout/staleness_drops"]:
            raise RuntimeError(f"{len(stale_uids)} buffered groups dropped unfiltered, the scheduler "
                               f"counts {m['rollout/staleness_drops']} stale drops: accounting broken")
        stale, filtered = sum(before[u] for u in stale_uids), sum(self.rejected.values())
        dropped = sum(before.values()) + m["rollout/generated_tokens"] - sum(lengths) - sum(after.values())
        return {"rollout_s": rollout_s, "useful_tokens": sum(lengths),
                "generated_tokens": m["rollout/generated_tokens"],
                "stale_tokens": stale, "unfinished_tokens": dropped - stale - filtered,
                "filtered_tokens": filtered,
                "buffered_tokens": sum(after.values()), "groups_returned": len(result.groups),
                "buffer_size": m["rollout/buffer_size"], "groups_resumed": m["rollout/groups_resumed"],
                "requests_aborted": m["rollout/requests_aborted"], "drops": m["rollout/drops"],
                "n_in_flight": m["rollout/in_flight_groups"],
                "offpolicy_tokens": round(m["rollout/offpolicy_token_fraction"] * sum(lengths)),
                "lengths": lengths}

    def close(self) -> None:
        self.scheduler.close()


class RawMode:
    """Plain `generate` requests, all submitted at once, no streaming and no scheduler."""

    def __init__(self, engine: Any, n_requests: int, length: int, prompts: Any) -> None:
        self.engine, self.n_requests, self.length, self.prompts = engine, n_requests, length, prompts

    async def rollout(self) -> dict[str, Any]:
        from rollover.rollout.engine import SamplingSettings

        sampling = SamplingSettings(temperature=1.0, ignore_eos=True)
        batch = [self.prompts()[2] for _ in range(self.n_requests)]
        started = time.perf_counter()
        outs = await asyncio.gather(*(self.engine.generate(p, self.length, sampling) for p in batch))
        rollout_s = time.perf_counter() - started
        lengths = [len(o.token_ids) for o in outs]
        return {"rollout_s": rollout_s, "useful_tokens": sum(lengths), "generated_tokens": sum(lengths),
                "stale_tokens": 0, "unfinished_tokens": 0, "buffered_tokens": 0,
                "groups_returned": 0, "buffer_size": 0, "groups_resumed": 0, "requests_aborted": 0,
                "drops": {}, "lengths": lengths}

    def close(self) -> None:
        pass


async def weight_sync(engine: Any, weights: dict[str, Any], version: int) -> float:
    """What training pays after a step: wait for idle, load weights (resets the prefix cache)."""
    started = time.perf_counter()
    await engine.wait_idle()
    await engine.update_weights(weights, version=version)
    return time.perf_counter() - started


async def interleaved(engine: Any, weights: dict[str, Any], modes: dict[str, Mode], warmup: int,
                      steps: int, log) -> dict[str, list[dict[str, Any]]]:
    """Step every mode in turn, each step followed by a weight sync; keep the post-warm-up steps."""
    kept: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    names = list(modes)
    for k in range(warmup + steps):
        version = engine.policy_version
        for j, name in enumerate(names):
            rec = await modes[name].rollout()
            rec["sync_s"] = await weight_sync(engine, weights, version + (j == len(names) - 1))
            if k >= warmup:
                kept[name].append(rec)
            log(f"  step {k:2d} {name:18s} {rec['useful_tokens'] / rec['rollout_s']:7.0f} useful tok/s "
                f"({rec['rollout_s']:.2f} s + sync {rec['sync_s']:.2f} s"
                f"{'' if k >= warmup else ', warm-up'})")
    return kept


def percentile(xs: list[int], q: float) -> int:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty list."""
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, math.ceil(q * len(xs)) - 1))]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's measured steps: throughput both ways, token accounting, returned lengths."""
    tot = {k: sum(r[k] for r in records) for k in TOKEN_KEYS + ("rollout_s", "sync_s")}
    lengths = [n for r in records for n in r["lengths"]]
    wasted = tot["stale_tokens"] + tot["unfinished_tokens"]
    return {
        "useful_tokens_per_s": tot["useful_tokens"] / (tot["rollout_s"] + tot["sync_s"]),
        "useful_tokens_per_s_rollout": tot["useful_tokens"] / tot["rollout_s"],
        "generated_tokens_per_s_rollout": tot["generated_tokens"] / tot["rollout_s"],
        **tot,
        "wasted_tokens": wasted,
        "wasted_token_fraction": wasted / tot["generated_tokens"] if tot["generated_tokens"] else 0.0,
        "buffered_tokens_end": records[-1]["buffered_tokens"],
        "returned_length": {"p50": percentile(lengths, 0.5), "p99": percentile(lengths, 0.99)},
        "steps": [{k: v for k, v in r.items() if k != "lengths"} for r in records],
    }
