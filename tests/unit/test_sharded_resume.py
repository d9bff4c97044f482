"""A run resumes exactly across trainer world sizes (2 -> 1, 1 -> 2, 2 -> 2), full fine-tune and LoRA.

One process trains a step, checkpoints, and trains a second; two spawned FSDP2 ranks (gloo),
driven through the mirror as rl-train drives them, train the same first step and checkpoint it
(the optimizer's state as each rank's DCP shards), then resume from the one-process checkpoint
and from their own and train the second step. The second step's weights must be the one-process
run's every way: from the ranks' checkpoint in one process (2 -> 1), on the ranks from one
process's (1 -> 2) and from their own (2 -> 2).
AdamW with a large lr: a moment lost or mis-sharded on the way moves the second update by
5e-3 to 1e-2 (the control: the same resume with a fresh optimizer). Sums in another order (the
ranks split each batch; another thread count) differ by ~1e-6 in a gradient, which Adam's
normalisation turns into up to ~8e-5 on weights whose moments are near zero: hence 2e-4.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_ranks  # noqa: E402 - tests/unit is on sys.path
import sharded_resume_ranks as ranks_main  # noqa: E402

from rollover.trainer.checkpoint import checkpoint_problem, find_checkpoint, save_checkpoint  # noqa: E402
from rollover.trainer.distributed.sharded_state import ShardedStateError  # noqa: E402
from rollover.trainer.learner import Learner  # noqa: E402
from rollover.trainer.distributed.launch import free_port  # noqa: E402
from rollover.trainer.policy import Policy  # noqa: E402
from rollover.trainer.run import load_checkpoint_weights  # noqa: E402

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 300
TOLERANCE = 2e-4  # see the module docstring


def one_process(kind: str, rows, folder: Path, fresh_optimizer: bool = False, start: Path | None = None):
    """Step 1 (or `start`'s checkpoint), then step 2, in one process; the weights after step 2."""
    torch.manual_seed(0)
    r = ranks_main.recipe(kind == "lora")
    policy = Policy(r.model, r.train.lora, torch.device("cpu"))
    if start is not None:
        load_checkpoint_weights(policy, start)
    learner = Learner(policy, r)
    if start is None:
        learner.update(rows[0], version=0, step=0)
        save_checkpoint(folder / f"single-{kind}", 1, learner, learner.optimizer_state(), keep=1,
                        write_shards=learner.save_sharded_state)
    elif not fresh_optimizer:
        learner.load_optimizer_state(start)
    learner.update(rows[1], version=1, step=1)
    return ranks_main.weights(learner)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("resume")
    rows = [fsdp_ranks.make_rows(seed=1), fsdp_ranks.make_rows(seed=2)]
    torch.save(rows, folder / "rows.pt")
    single = {kind: one_process(kind, rows, folder) for kind in ("full", "lora")}
    ranks = mp.spawn(ranks_main.rank_main, nprocs=WORLD_SIZE, join=False,
                     args=(WORLD_SIZE, free_port(), str(folder), str(folder / "rows.pt")))
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {SPAWN_TIMEOUT_S} s")
    return folder, rows, single, torch.load(folder / "ranks-results.pt", weights_only=False)


def close(a: dict, b: dict) -> float:
    """The largest absolute difference of any weight (same names, same order)."""
    assert list(a) == list(b)
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_one_process_checkpoint_resumes_on_two_ranks(runs, kind):
    _, _, single, sharded = runs
    assert close(sharded[kind], single[kind]) < TOLERANCE


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_rank_checkpoint_resumes_in_one_process(runs, kind):
    folder, rows, single, _ = runs
    start = folder / f"ranks-{kind}" / "checkpoints" / "step-000001"
    assert close(one_process(kind, rows, folder, start=start), single[kind]) < TOLERANCE
    # The control: the same resume without the optimizer's moments lands far off.
    assert close(one_process(kind, rows, folder, fresh_optimizer=True, start=start), single[kind]) > 10 * TOLERANCE


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_rank_checkpoint_resumes_on_two_ranks(runs, kind):
    _, _, single, sharded = runs
    assert close(sharded[f"{kind}-2to2"], single[kind]) < TOLERANCE


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_ranks_write_their_own_shards_and_never_gather_the_optimizer_state(runs, kind):
    folder, _, _, sharded = runs
    gathers = sharded[f"{kind}-gathers"]
    assert gathers["moments"] > 0  # rank 0 held sharded moments to watch
    assert gathers["gathered"] == []  # ... and writing the checkpoint gathered none of them whole
    start = folder / f"ranks-{kind}" / "checkpoints" / "step-000001"
    assert "optimizer" not in torch.load(start / "trainer_state.pt", weights_only=False)
    shards = {p.name for p in (start / "dcp").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-rank0.pt", "rng-rank1.pt"} <= shards
    listed = json.loads((start / "manifest.json").read_text())["files"]
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata"} <= set(listed)


@pytest.mark.parametrize("damage", ["missing", "cut"])
def test_a_damaged_shard_is_one_line_not_a_traceback(runs, tmp_path, damage):
    folder, _, _, _ = runs
    output = tmp_path / "run"
    start = output / "checkpoints" / "step-000001"
    shutil.copytree(folder / "ranks-full" / "checkpoints" / "step-000001", start)
    shard = start / "dcp" / "__1_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    expected = "dcp/__1_0.distcp is missing" if damage == "missing" else "dcp/__1_0.distcp has"
    assert checkpoint_problem(start).startswith(expected)
    assert find_checkpoint(output) == (None, [(start, checkpoint_problem(start))])  # resume skips it
    # Named directly (train.resume: PATH), its shards fail to load in one line, naming the file.
    r = ranks_main.recipe(False)
    learner = Learner(Policy(r.model, r.train.lora, torch.device("cpu")), r)
    with pytest.raises(ShardedStateError) as failure:
        learner.load_optimizer_state(start)
    assert "\n" not in str(failure.value) and expected in str(failure.value)
