"""Two FSDP2 ranks (gloo, CPU) compute the update one process computes on the whole batch.

One spawn runs every variant of tests/unit/fsdp_ranks.py sharded over 2 ranks; here each is
run again in one process with `train_on_batch` as it is used today, and the engine weights
after the step (gathered from the shards bucket by bucket, LoRA merged), the gradient norm and
the loss must agree to ~1e-5. Plain SGD without clipping in most variants, so a gradient off by
a factor (a local normaliser, or ranks' gradients averaged where they must add up,
pytorch#162338) moves the weights by that factor; Adam normalises a factor away, so its
variants rely on the gradient norm.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_ranks  # noqa: E402 - tests/unit is on sys.path
from fsdp_ranks import MODEL, VARIANTS, Variant  # noqa: E402

from rollover.trainer.config import LoraConfig, ModelConfig  # noqa: E402
from rollover.trainer.distributed.batch_split import rank_share, split_by_tokens  # noqa: E402
from rollover.trainer.distributed.launch import free_port  # noqa: E402
from rollover.trainer.policy import Policy  # noqa: E402

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 300  # ~15 s here


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """{variant name: (stats, engine weights)} from 2 spawned ranks, and "initial"."""
    out = tmp_path_factory.mktemp("fsdp") / "results.pt"
    ranks = mp.spawn(fsdp_ranks.rank_main, nprocs=WORLD_SIZE, join=False,
                     args=(WORLD_SIZE, free_port(), str(out), [v.name for v in VARIANTS]))
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ranks.join(timeout=1):  # raises when a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {SPAWN_TIMEOUT_S} s (out of step in a collective?)")
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gathered_weights_are_the_policys_engine_weights(sharded_results, dtype):
    expected = Policy(ModelConfig(path=MODEL, dtype=dtype), LoraConfig(), torch.device("cpu")).engine_weights()
    info, gathered = sharded_results[f"initial-{dtype}"]
    assert list(gathered) == list(expected)  # the same names in the same order
    # Buckets close once they reach the size: none holds more than the size plus one tensor.
    sizes = info["bucket_sizes"]
    assert len(sizes) > 3 and all(total - last < fsdp_ranks.BUCKET_BYTES for total, last in sizes)
    assert info["sharded_after"] and info["sharded_after_early_stop"]  # every unit resharded
    for name, tensor in expected.items():
        assert gathered[name].dtype == tensor.dtype and torch.equal(gathered[name], tensor), name


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_two_ranks_make_the_one_process_update(sharded_results, variant: Variant):
    torch.set_num_threads(1)
    before = Policy(ModelConfig(path=MODEL, dtype=variant.dtype), LoraConfig(), torch.device("cpu")).engine_weights()
    stats, policy = fsdp_ranks.train(variant)
    expected = policy.engine_weights()
    sharded_stats, gathered = sharded_results[variant.name]
    assert "error" not in stats and "error" not in sharded_stats
    assert list(gathered) == list(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(gathered[name], tensor, rtol=variant.tolerance, atol=variant.tolerance,
                                   msg=lambda m: f"{name}: {m}")
    keys = ["updates", "nonfinite", "grad_norm", "tokens/active"]
    if variant.dtype == "float32":  # a near-zero sum of terms: relative agreement in full precision only
        keys += ["loss", "pg_loss"]
    for key in keys:
        assert sharded_stats[key] == pytest.approx(stats[key], rel=variant.tolerance, abs=1e-6), key
    # The step did something the comparison can see.
    assert max(float((expected[n].float() - before[n].float()).abs().max()) for n in before) > 1e-3
    if variant.grad_clip < 1e9:
        assert stats["grad_norm"] > variant.grad_clip  # clipping was active
    if variant.nan_row is not None:  # one rank saw the NaN; both refused that mini-batch
        assert stats["updates"] == 1 and stats["nonfinite"] == 1.0


class Sized:
    def __init__(self, length: int):
        self.length = length


def test_the_split_is_a_partition_balanced_by_tokens():
    lengths = [37, 5, 12, 80, 3, 3, 44, 19, 26, 8, 61]
    parts = split_by_tokens(lengths, 3)
    assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in part) for part in parts]
    # Greedy longest-first: no part exceeds the lightest by more than one row.
    assert max(totals) - min(totals) <= max(lengths)
    assert max(totals) <= sum(lengths) / 3 + max(lengths)
    assert parts == split_by_tokens(lengths, 3)  # every rank computes the same split


def test_each_rank_gets_its_rows_in_order_and_fewer_rows_than_ranks_leave_a_rank_empty():
    rows = [Sized(n) for n in (4, 9, 1)]
    shares = [rank_share(rows, rank, 4) for rank in range(4)]
    assert shares == [[rows[1]], [rows[0]], [rows[2]], []]
    rows = [Sized(n) for n in (10, 2, 2, 2, 2, 2)]
    first, second = (rank_share(rows, rank, 2) for rank in range(2))
    assert first == [rows[0]] and second == rows[1:]
    with pytest.raises(ValueError, match="outside"):
        rank_share(rows, 2, 2)
