"""Pipelined steps (`rollout.max_async`) on the shared real engine: conservation, staleness,
and a checkpoint that holds whatever was in flight or rolled out ahead.

Expected values come from the test's own bookkeeping: a spy records every batch the trainer
takes (its groups and the engine's version at that moment, which is the version it is trained
at), and the prompt cursor says which uids were drawn.
"""

import pytest

from rollover.rollout.ledger import BUFFERED, DROPPED, IN_FLIGHT, RETURNED
from rollover.tasks.registry import build_task
from rollover.tasks.rewards import RewardRunner
from rollover.trainer.checkpoint import load_trainer_state
from rollover.trainer.config import Recipe
from rollover.trainer.build import build_trainer
from rollover.trainer.policy import Policy
from rollover.trainer.run import load_checkpoint_weights
from rollover.trainer.tracking import Tracker

pytestmark = pytest.mark.integration
GROUPS = 3


def pipeline_recipe(tmp_path, max_async: int) -> Recipe:
    return Recipe.model_validate({
        "model": {"max_model_len": 256},
        "task": {"eval_size": 8},
        # A hot temperature makes long rambling answers: the rollout outlasts the update, so
        # weight loads land in the middle of running steps (the interrupt path).
        "rollout": {"groups_per_step": GROUPS, "group_size": 4, "max_tokens": 64, "temperature": 2.0,
                    "over_provision": 2.0, "max_async": max_async, "max_staleness": max_async},
        "algo": {"dynamic_sampling": False},
        "train": {"output_dir": str(tmp_path), "lr": 1e-4, "eval_every": 100, "save_every": 100},
        "tracking": {"wandb": "disabled"},
    })


class Spied:
    """A Trainer on the shared engine whose batches are recorded as the trainer takes them."""

    def __init__(self, recipe: Recipe, engine, folder):
        folder.mkdir(parents=True, exist_ok=True)
        self.task = build_task(recipe.task)
        self.rewards = RewardRunner.from_config(recipe.task, self.task)
        self.policy = Policy(recipe.model, recipe.train.lora)
        self.trainer = build_trainer(recipe, self.task, self.rewards, self.policy, engine,
                               Tracker(recipe.tracking, folder, {}, "test"), folder)
        self.batches: list[tuple[int, list]] = []  # (version trained at, groups)
        take = self.trainer.ahead.next_batch

        async def spy():
            result = await take()
            self.batches.append((engine.policy_version, result.groups))
            return result

        self.trainer.ahead.next_batch = spy

    def close(self, run) -> None:
        run(self.trainer.ahead.settle())
        self.trainer.scheduler.close()
        self.rewards.close()

    def trained_uids(self) -> list[int]:
        return [g.uid for _, groups in self.batches for g in groups]


def check_batches(batches, max_staleness: int) -> None:
    for version, groups in batches:
        assert len(groups) == GROUPS
        assert all(g.finished and g.scored for g in groups)
        oldest = min(v for g in groups for s in g.samples for v in s.versions)
        assert version - oldest <= max_staleness  # no trained token older than max_staleness


@pytest.mark.parametrize("max_async", [1, 2])
def test_pipelined_steps_conserve_and_checkpoint_what_runs_ahead(engine, run, tmp_path, restore_engine,
                                                                max_async):
    recipe = pipeline_recipe(tmp_path / "a", max_async)
    a = Spied(recipe, engine, tmp_path / "a")
    start_version = engine.policy_version
    try:
        metrics = [run(a.trainer.train_step()) for _ in range(4)]
        assert engine.policy_version == start_version + 4  # every update reached the engine
        # What is running ahead right now: ready batches and the step being rolled out.
        ahead = {g.uid for batch in a.trainer.ahead.ready for g in batch.groups}
        live = a.trainer.scheduler._live
        if live is not None:
            ahead |= {g.uid for g in live.accepted} | set(live.runs)
        assert ahead, "nothing was rolled out ahead of the trainer"
        checkpoint = run(a.trainer.save())
        saved = load_trainer_state(checkpoint)["scheduler"]
        places = {int(u): p for u, p in saved["ledger"]["place"].items()}
        saved_buffer = {g["uid"] for g in saved["buffer"]["groups"]}
        # The checkpoint holds whatever ran ahead, in the buffer; nothing is in flight.
        assert ahead <= saved_buffer == {u for u, p in places.items() if p == BUFFERED}
        assert IN_FLIGHT not in places.values()
        assert {u for u, p in places.items() if p == RETURNED} == set(a.trained_uids())
        before_save = a.trained_uids()
        metrics += [run(a.trainer.train_step()) for _ in range(2)]
        check_batches(a.batches, max_async)
        # The weight loads met running steps (aborted, then resumed from their token ids), and
        # a trained sample holds tokens of two versions.
        assert sum(m["pipeline/interrupts"] for m in metrics) > 0
        assert any(len(set(s.versions)) > 1 for _, groups in a.batches for g in groups for s in g.samples)
        trained = a.trained_uids()
        assert len(trained) == len(set(trained)) == 6 * GROUPS
    finally:
        a.close(run)
    # Conservation over the whole run: every uid drawn is trained, buffered or dropped, once.
    ledger = a.trainer.scheduler.ledger
    drawn = set(range(a.trainer.prompts.cursor))
    assert ledger.uids(RETURNED) == set(trained)
    assert ledger.uids(BUFFERED) == a.trainer.scheduler.buffer.uids()
    assert ledger.uids(RETURNED) | ledger.uids(BUFFERED) | ledger.uids(DROPPED) == drawn
    assert not ledger.uids(IN_FLIGHT)

    # Resume from the checkpoint in a new trainer: the engine serves the checkpoint's weights.
    b = Spied(pipeline_recipe(tmp_path / "a", max_async), engine, tmp_path / "a")
    try:
        load_checkpoint_weights(b.policy, checkpoint)
        run(engine.wait_idle())
        run(engine.update_weights(b.policy.engine_weights(), version=saved["policy_version"]))
        run(b.trainer.restore(checkpoint))
        assert b.trainer.step == 4 and b.trainer.scheduler.buffer.uids() == saved_buffer
        for _ in range(2):
            run(b.trainer.train_step())
        check_batches(b.batches, max_async)
        resumed = b.trained_uids()
        assert len(resumed) == len(set(resumed)) == 2 * GROUPS
        assert not set(resumed) & set(before_save)  # nothing trained twice across the resume
        assert set(resumed) & saved_buffer  # what ran ahead before the checkpoint is trained now
    finally:
        b.close(run)
    ledger = b.trainer.scheduler.ledger
    assert ledger.uids(RETURNED) == set(before_save) | set(resumed)
    assert ledger.uids(RETURNED) | ledger.uids(BUFFERED) | ledger.uids(DROPPED) == set(
        range(b.trainer.prompts.cursor))
