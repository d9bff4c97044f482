"""Peak memory and time of per-token log-prob + entropy: chunked path vs naive, forward + backward.

Each measurement runs in a fresh subprocess so the peak is its own: the child reads its resident
set size after building the inputs, runs forward + backward through lm_head (hidden states and
weight both get gradients), and reports the peak RSS (`ru_maxrss`) above that baseline. RSS is
what the machine actually holds: torch's CPU tensors are invisible to tracemalloc. Time is the
best of the timed iterations over all repeats (the machine is shared, so the minimum is the
least noisy). Variants alternate order between repeats.

    python -m bench.gpu.logprob_memory [--tokens 2048 --hidden 256 --out FILE]

Writes JSON (default bench/results/logprob_memory.json) with `memory_ratio` and `time_ratio`
(chunked over naive) at the largest vocabulary, per-vocabulary details and machine info.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, save_json

VOCABS = (32000, 152064)  # Llama-2 and Qwen2-sized vocabularies
TARGETS = {"memory_ratio_max": 0.25, "time_ratio_max": 1.2}
DEFAULT_OUT = RESULTS / "logprob_memory.json"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(variant: str, vocab: int, tokens: int, hidden: int, chunk: int, iters: int) -> dict:
    """One variant in this (fresh) process: peak bytes above baseline and seconds per iteration."""
    import torch

    from rollover.kernels.logprobs import chunked_logprobs, naive_logprobs

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden).mul_(hidden**-0.5).requires_grad_()  # in place: no transient
    y = torch.randint(0, vocab, (tokens,))
    up_lp, up_ent = torch.randn(tokens), torch.randn(tokens)
    if variant == "naive":
        fn = lambda: naive_logprobs(h, w, y)  # noqa: E731
    else:
        fn = lambda: chunked_logprobs(h, w, y, chunk_size=chunk, backend="torch")  # noqa: E731
    baseline = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = []
    for _ in range(iters):
        h.grad = w.grad = None
        start = time.perf_counter()
        lp, ent = fn()
        (lp * up_lp + ent * up_ent).sum().backward()
        seconds.append(time.perf_counter() - start)
        del lp, ent
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_bytes": peak - baseline,
        "baseline_bytes": baseline,
        "baseline_was_peak": peak_before <= baseline * 1.02,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


def _run_child(variant: str, vocab: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.gpu.logprob_memory", "--child", variant, "--vocab", str(vocab),
           "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
           "--iters", str(args.iters)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} at vocab {vocab} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(vocab: int, args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {"naive": [], "chunked": []}
    for repeat in range(args.repeats):
        order = ("naive", "chunked") if repeat % 2 == 0 else ("chunked", "naive")
        for variant in order:
            runs[variant].append(_run_child(variant, vocab, args))
            print(f"vocab {vocab} {variant}: {runs[variant][-1]}", file=sys.stderr)
    summary = {}
    for variant, results in runs.items():
        # the first iteration of a process includes one-off costs; time the later ones
        timed = [s for r in results for s in (r["seconds"][1:] or r["seconds"])]
        summary[variant] = {
            "peak_mib": round(max(r["peak_bytes"] for r in results) / 2**20, 1),
            "seconds": round(min(timed), 3),
            "seconds_all": [round(s, 3) for s in timed],
            "baseline_was_peak": all(r["baseline_was_peak"] for r in results),
            "threads": results[0]["threads"],
        }
    summary["memory_ratio"] = round(summary["chunked"]["peak_mib"] / summary["naive"]["peak_mib"], 3)
    summary["time_ratio"] = round(summary["chunked"]["seconds"] / summary["naive"]["seconds"], 3)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--repeats", type=int, default=2, help="subprocesses per variant and vocabulary")
    parser.add_argument("--iters", type=int, default=2, help="forward+backward iterations per subprocess")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child = _child(args.child, args.vocab, args.tokens, args.hidden, args.chunk_size, args.iters)
        print(json.dumps(child))
        return {}

    info = machine()
    results = {str(vocab): _measure(vocab, args) for vocab in args.vocabs}
    info["load_avg_end"] = list(os.getloadavg())
    headline = results[str(max(args.vocabs))]
    report = {
        "benchmark": "per-token log-prob + entropy through lm_head, forward + backward, float32, CPU",
        "memory_ratio": headline["memory_ratio"],
        "time_ratio": headline["time_ratio"],
        "at_vocab": max(args.vocabs),
        "targets": TARGETS,
        "meets_targets": headline["memory_ratio"] <= TARGETS["memory_ratio_max"]
        and headline["time_ratio"] <= TARGETS["time_ratio_max"],
        "config": {"tokens": args.tokens, "hidden": args.hidden, "chunk_size": args.chunk_size,
                   "repeats": args.repeats, "iters": args.iters, "dtype": "float32",
                   "memory": "peak RSS above the post-setup baseline, fresh process per run"},
        "results": results,
        "machine": info,
    }
    save_json(report, args.out)
    print(json.dumps({k: report[k] for k in ("memory_ratio", "time_ratio", "meets_targets")}))
    return report


if __name__ == "__main__":
    main()
