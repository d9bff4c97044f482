"""Shared by the FSDP parity test: the variants, the fixed batch, and what one rank runs.

A variant trains a fresh `builtin:tiny-math` policy on the same rows; the spawned ranks run it
sharded (gloo, CPU) and rank 0 saves the gathered engine weights and the stats, which the test
compares with one process training on the whole batch.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass, field

import torch

from rollover.trainer.batch import Row
from rollover.trainer.config import AlgoConfig, LoraConfig, ModelConfig, TrainConfig
from rollover.trainer.policy import Policy
from rollover.trainer.precision import low_precision
from rollover.trainer.update import ONE_PROCESS, NonFiniteLoss, Ranks, train_on_batch

MODEL = "builtin:tiny-math"
VERSION = 3  # rows' tokens of versions < 3 are stale
BUCKET_BYTES = 1 << 16


@dataclass(frozen=True)
class Variant:
    name: str
    loss: str
    updates: int = 2
    lora: bool = False
    kl_coef: float = 0.0
    grad_clip: float = 1e9  # no clipping: a gradient off by a factor would show in the update
    optimizer: str = "sgd"
    nan_row: int | None = None  # this row's advantage is NaN: its mini-batch is refused
    dtype: str = "float32"  # the compute dtype (float32 masters either way)
    # bfloat16: one process autocasts, the ranks cast with FSDP's mixed-precision policy, so the
    # two agree only to bfloat16's precision.
    tolerance: float = 1e-5
    algo: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False  # model.gradient_checkpointing: recomputed in backward


VARIANTS = [
    Variant("grpo", "grpo"),
    Variant("dapo-one-update-clipped", "dapo", updates=1, grad_clip=0.05),
    Variant("dr_grpo-kl", "dr_grpo", kl_coef=0.1),
    Variant("gspo-adamw", "gspo", optimizer="adamw"),
    Variant("lora-grpo-kl", "grpo", lora=True, kl_coef=0.1, optimizer="adamw"),
    Variant("grpo-gradient-checkpointing", "grpo", gradient_checkpointing=True),
    Variant("grpo-nan-second-minibatch", "grpo", nan_row=13),
    Variant("grpo-bfloat16", "grpo", dtype="bfloat16", tolerance=2e-2),
    Variant("lora-bfloat16", "grpo", lora=True, dtype="bfloat16", tolerance=2e-2),
]


def make_rows(count: int = 14, seed: int = 0) -> list[Row]:
    """Rows of varied lengths and advantages; some tokens stale, one peer row (no behaviour)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        prompt = [rng.randrange(4, 100) for _ in range(rng.randint(3, 12))]
        response = [rng.randrange(4, 100) for _ in range(rng.randint(1, 20))]
        behaviour = [-rng.uniform(0.5, 6.0) for _ in response]
        versions = [VERSION - (j % 3 == 0 and i % 2) for j in range(len(response))]
        rows.append(Row(prompt, response, behaviour, versions, rng.uniform(-2.0, 2.0), i % 5 == 4))
    rows[6].behaviour_logprobs, rows[6].versions = None, None
    return rows


def train(variant: Variant, ranks: Ranks = ONE_PROCESS, shard=None, seed: int = 0):
    """One `train_on_batch` of `variant` on a fresh policy: (stats, policy trained); `shard`
    wraps the policy first (the sharded run). `seed`: the LoRA adapter's random init."""
    torch.manual_seed(seed)
    policy = Policy(ModelConfig(path=MODEL, dtype=variant.dtype, gradient_checkpointing=variant.gradient_checkpointing),
                    LoraConfig(enabled=variant.lora, r=4, alpha=8),
                    torch.device("cpu"))
    if variant.kl_coef > 0:
        policy.enable_reference()
    if shard is not None:
        policy = shard(policy)
    params = policy.trainable_parameters()
    optimizer = (torch.optim.SGD(params, lr=0.5) if variant.optimizer == "sgd"
                 else torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    algo = AlgoConfig(loss=variant.loss, kl_coef=variant.kl_coef, offpolicy="tis", mask_truncated=True,
                      **variant.algo)
    train_cfg = TrainConfig(updates_per_batch=variant.updates, micro_batch_tokens=48, grad_clip=variant.grad_clip)
    rows = make_rows()
    if variant.nan_row is not None:
        rows[variant.nan_row].advantage = float("nan")
    try:
        stats = train_on_batch(policy, optimizer, schedule, rows, algo, train_cfg, version=VERSION,
                               max_tokens=20, temperature=1.0, seed=11, ranks=ranks)
    except NonFiniteLoss as exc:
        stats = {"error": str(exc)}
    return stats, policy


def rank_main(rank: int, world_size: int, port: int, out: str, names: list[str]) -> None:
    """One rank: every variant in `names`, sharded; rank 0 saves {name: (stats, weights)} to `out`
    (and "initial": the gathered weights of an untrained sharded policy)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from rollover.trainer.distributed.gather import engine_weight_buckets
    from rollover.trainer.distributed.ranks import GroupRanks
    from rollover.trainer.distributed.shard import ShardedPolicy

    torch.set_num_threads(1)
    # A rank stuck in a collective (ranks out of step) fails in minutes rather than hanging
    # (generous: a busy CI machine can hold one rank back for a while).
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=240))
    try:
        def gathered(policy, sizes: list | None = None) -> dict[str, torch.Tensor]:
            # A small bucket size: many buckets, so the bucketing itself is exercised. `sizes`:
            # each bucket's (bytes, bytes of its last tensor).
            weights = {}
            for bucket in engine_weight_buckets(policy, bucket_bytes=BUCKET_BYTES):
                weights.update((name, t.clone()) for name, t in bucket)
                if sizes is not None:
                    sizes.append((sum(t.numel() * t.element_size() for _, t in bucket),
                                  bucket[-1][1].numel() * bucket[-1][1].element_size()))
            return weights

        def sharded(policy) -> bool:
            return all(isinstance(p, DTensor) for p in policy.model.parameters())

        results = {}
        for dtype in ("float32", "bfloat16"):
            initial = ShardedPolicy(Policy(ModelConfig(path=MODEL, dtype=dtype), LoraConfig(), torch.device("cpu")))
            sizes: list[tuple[int, int]] = []
            weights = gathered(initial, sizes)
            sharded_after = sharded(initial)
            # the walk gathers a unit at a time and leaves every parameter sharded again,
            # also when its reader stops after the first bucket
            walk = engine_weight_buckets(initial, bucket_bytes=BUCKET_BYTES)
            next(walk)
            walk.close()
            results[f"initial-{dtype}"] = ({"bucket_sizes": sizes, "sharded_after": sharded_after,
                                            "sharded_after_early_stop": sharded(initial)}, weights)
        for variant in VARIANTS:
            if variant.name in names:
                # Each rank's own adapter init: sharding must start from rank 0's (seed 0, as the
                # one-process run).
                stats, policy = train(variant, GroupRanks(), ShardedPolicy, seed=rank)
                assert not low_precision(policy.trainable_parameters())  # float32 masters, sharded
                results[variant.name] = (stats, gathered(policy))
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
