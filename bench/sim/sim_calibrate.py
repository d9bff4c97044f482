"""The simulator's engine costs, from this repository's measured figures (bench/results/*.json)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.common import RESULTS
from bench.sim.sim_engine import SimCosts

PROMPT_LEN = 16  # tokens of a simulated prompt; its prefill is inside the measured decode costs


def calibrate(results: Path = RESULTS) -> dict[str, Any]:
    """Engine costs from the measured figures, with where each number came from.

    - decode: april_throughput.json's no-tail raw `generate` runs (N*G and N'*G requests of the
      same length L, no scheduler): seconds per decode iteration = rollout_s / steps / L at two
      batch sizes; a straight line through them gives base and per-sequence costs (medians over
      repetitions; prefill of the short prompts is inside these figures).
    - weight sync: the same file's `sync_s` per step (wait_idle + update_weights), median.
    - train step: e2e_vs_trl.json's toy workload (8 groups x 8, as one simulated engine's
      share): seconds per step x trainer busy fraction, median over the rl-train systems;
      pipeline_steps.json's figure (G=16, 128 samples) is reported beside it.
    """
    out: dict[str, Any] = {"sources": {}}
    tp = json.loads((results / "april_throughput.json").read_text())
    cfg = tp["config"]
    n, g, op = cfg["groups"], cfg["group_size"], cfg["over_provision"]
    batch_lo, batch_hi = n * g, math.ceil(op * n) * g
    per_iter: dict[int, list[float]] = {batch_lo: [], batch_hi: []}
    syncs = []
    for rep in tp["repetitions"]:
        L = rep["no_tail"]["length"]
        for mode, batch in (("raw_generate", batch_lo), ("raw_generate_wide", batch_hi)):
            m = rep["no_tail"][mode]
            per_iter[batch].append(m["rollout_s"] / len(m["steps"]) / L)
        for part in ("long_tail", "no_tail"):
            for m in rep[part].values():
                if isinstance(m, dict) and "sync_s" in m:
                    syncs.append(m["sync_s"] / len(m["steps"]))
    lo, hi = (statistics.median(per_iter[b]) for b in (batch_lo, batch_hi))
    per_seq = (hi - lo) / (batch_hi - batch_lo)
    out["decode"] = {"iteration_s_at_batch": {str(batch_lo): lo, str(batch_hi): hi},
                     "base_s": lo - per_seq * batch_lo, "per_seq_s": per_seq}
    out["sync_s"] = statistics.median(syncs)
    out["sources"]["decode"] = ("april_throughput.json repetitions[*].no_tail.raw_generate(_wide): "
                                "rollout_s / steps / length, medians; linear in batch size")
    out["sources"]["sync_s"] = "april_throughput.json repetitions[*].*.sync_s / steps, median"
    trains = []
    e2e_path = results / "e2e_vs_trl.json"
    if e2e_path.exists():
        e2e = json.loads(e2e_path.read_text())
        for w in e2e["workloads"].values():
            for name, s in w["systems"].items():
                busy = s.get("pipeline", {}).get("pipeline/trainer_busy")
                if busy and name in ("sync", "april"):
                    trains.append(s["seconds_per_step"]["median"] * busy)
    pipe_path = results / "pipeline_steps.json"
    if pipe_path.exists():
        april = json.loads(pipe_path.read_text())["settings"].get("april", {})
        if april.get("pipeline/trainer_busy"):
            out["train_s_pipeline_steps_g16"] = april["seconds_per_step"] * april["pipeline/trainer_busy"]
    out["train_s"] = statistics.median(trains) if trains else 0.2
    out["sources"]["train_s"] = ("e2e_vs_trl.json workloads.toy.systems.{sync,april}: seconds_per_step "
                                 "median x pipeline/trainer_busy, median" if trains else "default 0.2 s")
    out["measured_long_tail_rollout_s_per_step"] = {
        mode: statistics.median(rep["long_tail"][mode]["rollout_s"] / len(rep["long_tail"][mode]["steps"])
                                for rep in tp["repetitions"])
        for mode in ("sync", "april_s4")}
    out["measured_config"] = {k: cfg[k] for k in ("dist", "median", "sigma", "max_len", "groups",
                                                   "group_size", "over_provision")}
    return out


def costs_of(cal: dict[str, Any], args: argparse.Namespace, prefill: float | None = None) -> SimCosts:
    """The engine costs: calibrated, or as the options set them. Only resumed context is charged
    prefill (the fresh prompts' prefill is inside the raw-generate figures)."""
    if prefill is None:
        prefill = args.prefill_per_token_s if args.prefill_per_token_s is not None \
            else cal.get("resume_prefill_per_token_s", 0.0)
    return SimCosts(base_s=cal["decode"]["base_s"], per_seq_s=cal["decode"]["per_seq_s"],
                    sync_s=args.sync_s if args.sync_s is not None else cal["sync_s"],
                    prefill_per_token_s=prefill, prefill_free_tokens=PROMPT_LEN)
