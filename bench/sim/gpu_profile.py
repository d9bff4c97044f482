"""The simulator's `gpu` calibration: a 7B model served by vLLM on one H100-class GPU per engine,
with every cost traced to a published figure or to a named assumption (cited in the JSON).

Cost model (SimEngine's, bench/sim/sim_engine.py): a decode iteration costs
`base + per_seq * running`; a resumed context costs a prefill per token; a weight load `sync_s`;
the trainer's step `train_s`.

- base: the iteration reads every weight once: bytes of a 7B model in bf16 over the GPU's HBM
  bandwidth, at the fraction of the bandwidth vLLM reaches at batch 1 (published);
- per_seq: fitted so that a batch of `THROUGHPUT_BATCH` running requests yields the published
  vLLM output throughput of an 8B model on one H100 (the batch is an assumption: vLLM's default
  `max_num_seqs`);
- prefill: the forward FLOPs of one token (2 x parameters) at an assumed model FLOPs utilisation;
- sync_s: published weight-update times of larger models scaled to 7B by bytes (an assumption;
  geometric mean of the two scaled figures);
- train_s: set by the published rollout share of a synchronous step (`ROLLOUT_SHARE` of it is
  rollout): `train_s + sync_s = R (1 - share) / share`, R = the simulated synchronous rollout
  at the reference engine count (`fit_train_s`).

Workload (long chain-of-thought math): log-normal response lengths, median 1,024 tokens, sigma 1,
capped at 16,384 (16x the median; ROLL Flash reports the longest exceeding the median by more
than 20x). To keep 1,024 engines within minutes of CPU, the simulation moves tokens in blocks of
`BLOCK` tokens: one simulated token is BLOCK real ones, one simulated iteration BLOCK real
iterations (costs x BLOCK), and token counts are reported x BLOCK. The cost model is linear in
tokens, so this changes only the granularity (a request ends on a block boundary).
"""

from __future__ import annotations

import math
from typing import Any

from bench.sim.sim_calibrate import PROMPT_LEN
from bench.sim.sim_engine import SimCosts

BLOCK = 64  # real tokens per simulated token
THROUGHPUT_BATCH = 256  # assumption: vLLM's default max_num_seqs, the batch behind the throughput figure
ROLLOUT_SHARE = 0.75  # within the published 70-85%; ROLL Flash: "over 70%"
REFERENCE_ENGINES = 64  # where the rollout share is set (the headline engine count)

# Every number the profile uses: value, source, and what the figure is.
FIGURES: dict[str, dict[str, Any]] = {
    "params": {"value": 7.6e9, "source": "Qwen2.5-7B model card (Hugging Face, Qwen/Qwen2.5-7B)",
               "figure": "7.61B parameters (the 7B model of verl's fully-async figure)"},
    "hbm_bytes_per_s": {"value": 3.35e12, "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM)",
                        "figure": "HBM3 bandwidth 3.35 TB/s (H200: 4.8 TB/s, so H100 is the slower case)"},
    "bf16_flops": {"value": 989e12, "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM)",
                   "figure": "bf16 dense tensor throughput 989 TFLOPS"},
    "decode_bandwidth_fraction": {
        "value": 0.77, "source": "johnmusgrave.com/p/vllm-throughput-latency-sweep-on (vLLM, Llama-3.1-8B)",
        "figure": "decode at one request runs at about 77% of the GPU's memory-bandwidth ceiling"},
    "decode_tokens_per_s": {
        "value": 12500.0, "source": "morphllm.com/vllm-benchmarks (third-party vLLM benchmarks table)",
        "figure": "Llama 3.1 8B BF16 on 1x H100 80GB: ~12,500 output tokens/s"},
    "prefill_mfu": {"value": 0.5, "source": "assumption",
                    "figure": "prefill (compute-bound) at 50% of bf16 peak"},
    "weight_update_s_106b": {
        "value": 3.94, "params": 106e9,
        "source": "github.com/MoonshotAI/checkpoint-engine README (benchmark table)",
        "figure": "GLM-4.5-Air (106B, BF16, 8x H800): weight update 3.94 s (broadcast)"},
    "weight_update_s_30b": {
        "value": 7.0, "params": 30.5e9,
        "source": "hebiao064.github.io/rl-weight-sync (slime: Optimizing Weight Sync)",
        "figure": "Qwen3-30B-A3B colocated weight update brought from 60 s to 7 s"},
    "rollout_share": {
        "value": ROLLOUT_SHARE,
        "source": "ROLL Flash, arXiv 2510.11345, section 1 (citing He et al. 2025, Gao et al. 2025)",
        "figure": "the rollout stage accounts for over 70% of total training time; 0.75 used "
                  "(issue 26: 70-85% for long chain-of-thought math)"},
    "tail_over_median": {
        "value": 20.0, "source": "ROLL Flash, arXiv 2510.11345, section 1",
        "figure": "the longest responses can exceed the median length by more than 20x "
                  "(the workload caps at 16x)"},
}

# What the pipelined systems report against synchronous training (for the README, not used).
PUBLISHED_SPEEDUPS: dict[str, dict[str, str]] = {
    "AReaL": {"value": "2.77x", "source": "AReaL, arXiv 2505.24298, abstract",
              "figure": "up to 2.77x training speedup over synchronous systems, same GPUs (math, code)"},
    "verl fully_async": {"value": "2.35-2.67x",
                         "source": "verl.readthedocs.io/en/latest/advance/fully_async.html",
                         "figure": "2.35x-2.67x training Qwen2.5-7B on 128 GPUs"},
    "ROLL Flash": {"value": "2.24x", "source": "ROLL Flash, arXiv 2510.11345, abstract",
                   "figure": "up to 2.24x speedup on RLVR tasks, same GPU budget"},
}

WORKLOAD = {"dist": "lognormal", "median_tokens": 1024, "sigma": 1.0, "max_len_tokens": 16384,
            "prompt_tokens": PROMPT_LEN * BLOCK}


def derived() -> dict[str, float]:
    """Per-real-token costs from FIGURES (seconds)."""
    f = {k: v["value"] for k, v in FIGURES.items()}
    weight_bytes = 2 * f["params"]  # bf16
    base = weight_bytes / (f["hbm_bytes_per_s"] * f["decode_bandwidth_fraction"])
    iteration_at_batch = THROUGHPUT_BATCH / f["decode_tokens_per_s"]
    per_seq = (iteration_at_batch - base) / THROUGHPUT_BATCH
    prefill = 2 * f["params"] / (f["bf16_flops"] * f["prefill_mfu"])
    scaled = [FIGURES[k]["value"] * f["params"] / FIGURES[k]["params"]
              for k in ("weight_update_s_106b", "weight_update_s_30b")]
    sync = math.sqrt(scaled[0] * scaled[1])
    return {"base_s": base, "per_seq_s": per_seq, "prefill_per_token_s": prefill, "sync_s": sync,
            "sync_s_scaled_from": scaled}


def gpu_costs(block: int = BLOCK) -> SimCosts:
    """SimCosts per simulated token (a block of `block` real tokens)."""
    d = derived()
    return SimCosts(base_s=d["base_s"] * block, per_seq_s=d["per_seq_s"] * block, sync_s=d["sync_s"],
                    prefill_per_token_s=d["prefill_per_token_s"] * block, prefill_free_tokens=PROMPT_LEN)


def train_s_for(rollout_s: float, sync_s: float, share: float = ROLLOUT_SHARE) -> float:
    """The train step that makes `rollout_s` `share` of a synchronous step (rollout + train + sync)."""
    return max(0.0, rollout_s * (1 - share) / share - sync_s)


def calibration(block: int = BLOCK) -> dict[str, Any]:
    """The profile as the JSON records it: figures with sources, derived costs, the workload."""
    d = derived()
    return {
        "name": "gpu",
        "model": "7B dense (Qwen2.5-7B) in bf16, one H100-class GPU per engine, vLLM",
        "figures": FIGURES,
        "published_speedups": PUBLISHED_SPEEDUPS,
        "derived_per_real_token": d,
        "assumptions": {
            "throughput_batch": f"{THROUGHPUT_BATCH} running requests behind the 12,500 tok/s figure",
            "sync_s": "7B weight update = geometric mean of the 106B and 30B published times scaled by "
                      "parameter count (disaggregated NCCL or colocated IPC alike)",
            "per_seq_constant": "per-sequence decode cost does not grow with the context (KV reads do)",
            "rollout_share": f"train_s set so rollout is {ROLLOUT_SHARE:.0%} of a synchronous step at "
                             f"{REFERENCE_ENGINES} engines",
        },
        "block_tokens": block,
        "workload": WORKLOAD,
        "used": {"base_s": d["base_s"] * block, "per_seq_s": d["per_seq_s"] * block,
                 "prefill_per_token_s": d["prefill_per_token_s"] * block, "sync_s": d["sync_s"],
                 "note": "per simulated token (x block_tokens real ones)"},
    }
