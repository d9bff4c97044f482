"""The update step and per-rank memory with 1 and 2 data-parallel trainer ranks (FSDP2, gloo, CPU).

A random-weight Qwen2 of about 100M parameters (built in memory from a config, saved to a
temporary folder for `Policy` to load; nothing downloaded) trains on one fixed batch. Each
setting runs in fresh processes so its memory is its own:

- `one-process`: today's trainer, `train_on_batch` on an unsharded `Policy` with every core;
- `fsdp-N`: N ranks, one core each, `ShardedPolicy` + `GroupRanks` (trainer/distributed/).

Per rank: the seconds of each update step (median and spread over `--repeats`, after one
warm-up step), the bytes of its parameter, gradient and AdamW state tensors (measured from the
tensors: a DTensor's local shard; gradients just before the optimizer step), the process RSS
after loading, after sharding, after the steps (and again once glibc has returned its freed
heap: the allocator keeps ~0.8 GB of freed transients resident here) and its peak (`ru_maxrss`:
it includes loading the whole model, which every rank does before sharding, and the step's
transients), and the seconds to gather the engine's weights (`engine_weight_buckets`, or
`Policy.engine_weights` for one process). Step times are only as good as the machine is idle:
`machine.load_avg_start`/`load_avg_end` say how busy it was.

    python -m bench.trainer.trainer_scaling [--repeats 3 --rows 16 --out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, machine, save_json, spread

DEFAULT_OUT = RESULTS / "trainer_scaling.json"
# ~100M parameters: 12 layers of hidden 768 (GQA, 2 KV heads) and a tied 32k vocabulary.
MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=1024,
             tie_word_embeddings=True)
SETTINGS = {"one-process": 1, "fsdp-1": 1, "fsdp-2": 2}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def save_model(folder: Path) -> int:
    """The random-weight Qwen2 and the built-in tokenizer in `folder`; its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rollover.trainer.builtin.models import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**MODEL, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def make_rows(count: int, seed: int = 0):
    """Rows with prompts of 16-64 and responses of 16-128 random tokens, mixed advantages."""
    from rollover.trainer.batch import Row

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = [rng.randrange(4, MODEL["vocab_size"]) for _ in range(rng.randint(16, 64))]
        response = [rng.randrange(4, MODEL["vocab_size"]) for _ in range(rng.randint(16, 128))]
        rows.append(Row(prompt, response, [-2.0] * len(response), [0] * len(response),
                        rng.uniform(-1.5, 1.5), False))
    return rows


def _trimmed_rss_bytes() -> int | None:
    """RSS after glibc hands its freed heap back (`malloc_trim`): what the process holds, less
    the allocator's cache; None where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return _rss_bytes()


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def _rank(rank: int, world_size: int, port: int, setting: str, folder: str, args: dict, out: str) -> None:
    """One rank of one setting: its figures as JSON in `out`.rank<N>."""
    import torch
    import torch.distributed as dist

    from rollover.trainer.config import AlgoConfig, LoraConfig, ModelConfig, TrainConfig
    from rollover.trainer.optim import build_optimizer
    from rollover.trainer.policy import Policy
    from rollover.trainer.update import ONE_PROCESS, train_on_batch

    sharded = setting != "one-process"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the same cores in all
    if sharded:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    rss_start = _rss_bytes()
    policy = Policy(ModelConfig(path=folder, dtype="float32"), LoraConfig(), torch.device("cpu"))
    rss_loaded = _rss_bytes()
    ranks = ONE_PROCESS
    if sharded:
        from rollover.trainer.distributed.gather import engine_weight_buckets
        from rollover.trainer.distributed.ranks import GroupRanks
        from rollover.trainer.distributed.shard import ShardedPolicy

        policy, ranks = ShardedPolicy(policy), GroupRanks()
    rss_sharded = _rss_bytes()
    params = policy.trainable_parameters()
    optimizer = build_optimizer(params, lr=1e-6, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    grad_bytes: list[int] = []
    optimizer.register_step_pre_hook(
        lambda *_: grad_bytes.append(_local_bytes(p.grad for p in params if p.grad is not None)))
    algo, train = AlgoConfig(loss="grpo"), TrainConfig(updates_per_batch=1, micro_batch_tokens=args["micro_tokens"])
    rows = make_rows(args["rows"])
    step_s = []
    for step in range(args["repeats"] + 1):  # the first is a warm-up
        if sharded:
            dist.barrier()
        start = time.perf_counter()
        train_on_batch(policy, optimizer, schedule, rows, algo, train, version=0, max_tokens=128,
                       temperature=1.0, seed=step, ranks=ranks)
        if step:
            step_s.append(time.perf_counter() - start)
    rss_end = _rss_bytes()
    rss_end_trimmed = _trimmed_rss_bytes()
    start = time.perf_counter()
    if sharded:
        for bucket in engine_weight_buckets(policy):
            del bucket
    else:
        policy.engine_weights()
    gather_s = time.perf_counter() - start
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    figures = {
        "rank": rank, "threads": torch.get_num_threads(), "step_s": step_s, "gather_s": round(gather_s, 3),
        "param_bytes": _local_bytes(params), "grad_bytes": max(grad_bytes), "optimizer_bytes": _local_bytes(state),
        "rss_start_bytes": rss_start, "rss_loaded_bytes": rss_loaded, "rss_sharded_bytes": rss_sharded,
        "rss_end_bytes": rss_end, "rss_end_trimmed_bytes": rss_end_trimmed, "rss_peak_bytes": _peak_rss_bytes(),
    }
    figures["state_bytes"] = figures["param_bytes"] + figures["grad_bytes"] + figures["optimizer_bytes"]
    Path(f"{out}.rank{rank}").write_text(json.dumps(figures))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def run_setting(setting: str, folder: str, args: dict, scratch: str) -> dict:
    """Every rank of `setting` in fresh processes; the per-rank figures and their summary."""
    import torch.multiprocessing as mp

    from rollover.trainer.distributed.launch import free_port

    world_size = SETTINGS[setting]
    out = str(Path(scratch) / setting)
    mp.spawn(_rank, args=(world_size, free_port(), setting, folder, args, out), nprocs=world_size, join=True)
    ranks = [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in range(world_size)]
    # A step takes as long as its slowest rank.
    steps = [max(r["step_s"][i] for r in ranks) for i in range(args["repeats"])]
    return {
        "world_size": world_size, "step_s": spread(steps),
        "state_bytes_per_rank_max": max(r["state_bytes"] for r in ranks),
        "rss_peak_bytes_per_rank_max": max(r["rss_peak_bytes"] for r in ranks),
        "gather_s_max": max(r["gather_s"] for r in ranks),
        "ranks": ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed update steps per setting")
    parser.add_argument("--rows", type=int, default=16, help="rows in the batch (16-64 + 16-128 tokens each)")
    parser.add_argument("--micro-tokens", type=int, default=2048, help="train.micro_batch_tokens")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    options = parser.parse_args()
    if options.repeats < 1 or options.rows < 1:
        parser.error("--repeats and --rows must be at least 1")
    args = {"repeats": options.repeats, "rows": options.rows, "micro_tokens": options.micro_tokens}
    result = {"machine": machine(), "model": MODEL, "args": args, "settings": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        folder = str(Path(scratch) / "model")
        result["parameters"] = save_model(Path(folder))
        for setting in options.settings:
            result["settings"][setting] = run_setting(setting, folder, args, scratch)
            save_json(result, options.out)  # what is done survives a later failure
    one, two = result["settings"].get("one-process"), result["settings"].get("fsdp-2")
    if one and two:
        state_ratio = two["state_bytes_per_rank_max"] / one["state_bytes_per_rank_max"]
        result["state_bytes_ratio_2_over_1"] = round(state_ratio, 3)
        result["step_s_ratio_2_over_1"] = round(two["step_s"]["median"] / one["step_s"]["median"], 3)
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    result["bench_wall_s"] = round(time.perf_counter() - started, 1)
    save_json(result, options.out)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
