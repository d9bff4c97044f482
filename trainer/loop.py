"""The training loop: APRIL rollout -> rewards -> filters -> advantages -> updates -> weight sync.

`Trainer` holds the parts a run needs (policy, optimizer, engine, scheduler, tracker) and
`train()` runs steps until `train.steps`, evaluating and checkpointing on schedule.

Batches come from `RolloutAhead`: with `rollout.max_async: 0` each is rolled out when asked
for; with k > 0 the engine generates the next ones while the update runs (in a worker thread,
so the event loop keeps streaming), and the new weights are loaded as soon as they are ready.
Evaluations and checkpoints settle the pipeline first, so they happen between steps as before.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import pstdev, stdev
from typing import Any

import torch

from rollover.algos.advantages import group_advantages
from rollover.rollout.pipeline import RolloutAhead
from rollover.rollout.april import AprilScheduler
from rollover.rollout.buffer import group_age
from rollover.rollout.engine_api import Engine
from rollover.rollout.types import Group
from rollover.rollout.weights.weight_check import CheckedWeightSync, WeightSyncFailed, within
from rollover.swarm.node import SwarmNode
from rollover.tasks.errors import RolloverError
from rollover.tasks.prompts import prompt_ids
from rollover.tasks.registry import Task
from rollover.tasks.rewards import RewardRunner
from rollover.trainer.batch import rows_from_groups
from rollover.trainer.checkpoint import load_trainer_state, save_checkpoint, set_rng_state
from rollover.trainer.config import Recipe
from rollover.trainer.evaluate import evaluate
from rollover.trainer.external import LocalJudge
from rollover.trainer.learner import Learner
from rollover.trainer.policy import Policy
from rollover.trainer.runtime.heap import collector_clock
from rollover.trainer.runtime.stopping import StopAtSafePoint, stop_requested, stoppable
from rollover.trainer.tracking import Tracker, busy_text, console, progress_bar
from rollover.trainer.runtime.run_folder import rewind_step_logs
from rollover.trainer.runtime.uid_log import log_trained
from rollover.trainer.update import NonFiniteLoss


class TrainingStopped(RolloverError, RuntimeError):
    """The run cannot go on (too many non-finite losses); the last checkpoint is intact."""


class PromptStream:
    """Fresh prompts for the scheduler: uid = draw index, so the cursor is one integer. Draw `uid`
    is the task's problem `first_index + uid` (a swarm node's own part of the stream)."""

    def __init__(self, task: Task, tokenizer, recipe: Recipe, cursor: int = 0, first_index: int = 0):
        self.task, self.tokenizer, self.recipe, self.cursor = task, tokenizer, recipe, cursor
        self.first_index = first_index

    def __call__(self) -> tuple[int, dict[str, Any], list[int]]:
        uid = self.cursor
        self.cursor += 1
        record = self.task.record(self.first_index + uid)
        return uid, record, prompt_ids(record, self.tokenizer, self.recipe.task.prompt_format,
                                       self.recipe.task.system_prompt)


@dataclass
class RolloutParts:
    """What the Trainer is handed, built from the recipe by the composition root (trainer/build.py)."""

    prompts: PromptStream  # fresh prompts for the scheduler; its cursor is checkpointed
    scheduler: AprilScheduler  # APRIL: N scored groups per step
    ahead: RolloutAhead  # the pipeline: batches rolled out ahead, and the weight-load rule
    weight_sync: CheckedWeightSync  # every load under a deadline, then proven by a log-prob probe
    judge: LocalJudge  # builds and scores peers' groups for the swarm
    learner: Learner  # the policy's optimizer and updates (one process, or N ranks in step)


class Trainer:
    def __init__(self, recipe: Recipe, task: Task, rewards: RewardRunner, policy: Policy, engine: Engine,
                 tracker: Tracker, output_dir: Path, parts: RolloutParts, swarm: SwarmNode | None = None):
        self.recipe, self.task, self.rewards, self.policy = recipe, task, rewards, policy
        self.engine, self.tracker, self.output_dir = engine, tracker, output_dir
        self.swarm = swarm  # SAPO: peers' groups join each step's batch (swarm/node.py)
        self.prompts, self.scheduler, self.ahead = parts.prompts, parts.scheduler, parts.ahead
        self.weight_sync, self.judge, self.learner = parts.weight_sync, parts.judge, parts.learner
        self.eval_records = task.eval_records(recipe.task.eval_size)
        self.eval_prompts = [prompt_ids(r, policy.tokenizer, recipe.task.prompt_format,
                                        recipe.task.system_prompt) for r in self.eval_records]
        self.step = 0
        self.bad_steps = 0
        self.evals: list[dict[str, float]] = []  # {"step", "accuracy", "reward"} per evaluation
        self.train_seconds = 0.0  # wall time of completed steps, carried across resumes

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    # ---- state -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {**self.learner.optimizer_state(), "scheduler": self.scheduler.state_dict(), "prompt_cursor": self.prompts.cursor,
                "bad_steps": self.bad_steps, "evals": self.evals, "train_seconds": self.train_seconds,
                "rewards": self.rewards.state_dict(),
                **({"swarm": self.swarm.state_dict()} if self.swarm else {})}

    async def restore(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`; the engine already serves its weights (started from it)."""
        state = load_trainer_state(checkpoint)
        self.learner.load_optimizer_state(checkpoint)
        self.engine.policy_version = self.scheduler.load_state_dict(state["scheduler"])  # started from it
        self.prompts.cursor = state["prompt_cursor"]
        self.bad_steps, self.evals = state["bad_steps"], state["evals"]
        self.train_seconds = state["train_seconds"]
        # Checkpoints written before per-step reward accounting hold only the failure totals.
        self.rewards.load_state_dict(state.get("rewards", {"failures": state.get("rewards_failures", {})}))
        self.step = state["step"]
        rewind_step_logs(self.output_dir, self.step)  # the steps after it are trained again
        if self.swarm is not None and "swarm" in state:
            self.swarm.load_state_dict(state["swarm"])
        set_rng_state(state["rng"])

    async def save(self) -> Path:
        """Checkpoint between steps: batches rolled out ahead go back to the buffer first."""
        await self.ahead.settle()
        return save_checkpoint(self.output_dir, self.step, self.learner, self.state(),
                               self.recipe.train.keep_checkpoints, self.learner.save_sharded_state)

    # ---- the loop --------------------------------------------------------------------------------

    async def run_eval(self, prefix: str = "eval") -> dict[str, Any]:
        """Evaluate and log under `prefix`; only `eval` results enter the run's curve."""
        await self.ahead.settle()  # the engine evaluates alone, and no rollout runs off the clock
        started = time.perf_counter()
        result = await evaluate(self.engine, self.task, self.rewards, self.eval_records,
                                self.eval_prompts, self.recipe.rollout.max_tokens)
        samples = result.pop("samples")
        if prefix != "eval":
            result = {k.replace("eval/", f"{prefix}/"): v for k, v in result.items()}
        else:
            self.evals.append({"step": self.step, "accuracy": result["eval/accuracy"],
                               "reward": result["eval/reward"], "train_seconds": self.train_seconds})
        result["time/eval"] = time.perf_counter() - started
        self.tracker.log(self.step, result)
        self.tracker.log_samples(self.step, samples[: self.recipe.tracking.sample_table_rows])
        return result

    async def train_step(self) -> dict[str, Any]:
        """One step: a batch of scored groups (rolled out ahead, when the pipeline runs), peers'
        groups beside it, advantages, the update, and the new weights into the engine."""
        clock = {"start": time.perf_counter()}
        collector_clock().take()  # from here: this step's collections (time/gc)
        result = await stoppable(self.ahead.next_batch())  # a stop files every group in the buffer
        clock["rollout"] = time.perf_counter()
        groups = result.groups
        token_age = oldest_token_age(groups, self.engine.policy_version)
        if token_age > self.recipe.rollout.max_staleness:
            raise RuntimeError(f"a batch holds a token {token_age} versions old (rollout.max_staleness="
                               f"{self.recipe.rollout.max_staleness}): a scheduler bug")
        external, swarm_metrics = ([], {}) if self.swarm is None else \
            await self.swarm.exchange(self.step, groups, self.judge)
        rows = self._rows(groups, external)
        clock["batch"] = time.perf_counter()
        stats = await self._update(rows)
        clock["train"] = time.perf_counter()
        await self._sync_weights(changed=stats["updates"] > 0, started=clock["train"])
        clock["sync"] = time.perf_counter()
        self.step += 1
        self.train_seconds += clock["sync"] - clock["start"]
        metrics = {**result.metrics, **group_metrics(groups, result.metrics.get("rollout/filter_drops", 0)),
                   **self._step_metrics(stats, rows, clock), "pipeline/max_token_age": token_age,
                   **swarm_metrics}
        self.tracker.log(self.step, metrics)
        log_trained(self.output_dir, self.step, [g.uid for g in groups])
        stop = self.rewards.stop_reason()  # a reward that fails on every sample is a bug
        if stop is not None:
            raise TrainingStopped(stop)
        return metrics

    async def _update(self, rows: list) -> dict[str, Any]:
        """The update, in a thread (the event loop keeps streaming the rollout running ahead);
        a non-finite loss is a counted bad step, never a crash."""
        await self.engine.sleep()  # rollout.sleep_mode: a colocated trainer gets the GPU memory back
        self.ahead.trainer_busy.start()
        try:
            stats = await asyncio.to_thread(self.learner.update, rows, version=self.engine.policy_version,
                                            step=self.step)
        except NonFiniteLoss as exc:
            self._count_bad_step(str(exc))
            stats = {"updates": 0.0, "nonfinite": 1.0}
        finally:
            self.ahead.trainer_busy.stop()
        refused = stats.pop("nonfinite_reason", None)
        if refused is not None:  # earlier mini-batches were applied: the weights did change
            self._count_bad_step(f"{refused}; the step's later updates were not applied")
        return stats

    async def _sync_weights(self, changed: bool, started: float) -> None:
        """Wake the engine; if any update was applied, load the new weights (the pipeline decides
        how they meet running requests) under the deadline, then prove them."""
        label = f"step {self.step + 1}"
        await within(self.engine.wake_up(), self.recipe.rollout.weight_load_timeout_s, f"{label}'s engine wake-up")
        weights = self.learner.engine_weights(cast=not transport_casts(self.engine)) if changed else None
        try:
            await self.ahead.load_weights(weights, lambda load: self.weight_sync.load(load, f"{label}'s weight sync"))
        except WeightSyncFailed:
            self.tracker.log(self.step + 1, {"weights/fingerprint_ok": 0.0,
                                             "time/weight_sync": time.perf_counter() - started})
            raise

    def _step_metrics(self, stats: dict[str, Any], rows: list, clock: dict[str, float]) -> dict[str, Any]:
        """The update's statistics, counters, and where the step's time went."""
        step_seconds = clock["sync"] - clock["start"]
        return {**stats, **({"kl": stats["kl_ref"]} if "kl_ref" in stats else {}),
                "policy_version": self.engine.policy_version,
                "bad_steps": self.bad_steps, "reward_failures": sum(self.rewards.failures.values()),
                **self.rewards.take_step_report(),  # reward_failures/<fn>: this step's failed samples
                "time/rollout": clock["rollout"] - clock["start"], "time/train": clock["train"] - clock["batch"],
                "time/weight_sync": clock["sync"] - clock["train"], "time/step": step_seconds,
                "time/gc": collector_clock().take(),  # the collector's stalls, inside the phases above
                **self.weight_sync.take_metrics(),  # weights/fingerprint_ok, when weights loaded
                **self.ahead.window_metrics(),
                "tokens_per_s": sum(len(r.response_ids) for r in rows) / step_seconds}

    def _rows(self, groups: list[Group], external: list[Group]) -> list:
        """Training rows: advantages within each group; a peer's group may have another size, so
        its advantages are computed alone (with `batch` std, over itself)."""
        std = self.recipe.advantage_std
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        rows = rows_from_groups(groups, group_advantages(rewards, std))
        for group in external:
            alone = group_advantages(torch.tensor([group.rewards], dtype=torch.float32), std)
            rows += rows_from_groups([group], alone)
        return rows

    def _count_bad_step(self, reason: str) -> None:
        """One more non-finite step; stop the run past `train.max_bad_steps`."""
        max_bad = self.recipe.train.max_bad_steps
        self.bad_steps += 1
        console.print(f"[yellow]step {self.step + 1}: {reason} ({self.bad_steps}/{max_bad} tolerated)")
        if self.bad_steps > max_bad:
            raise TrainingStopped(f"{self.bad_steps} non-finite losses (train.max_bad_steps="
                                  f"{max_bad}); last checkpoint is intact")

    async def train(self, resumed: bool = False) -> dict[str, Any]:
        """Train to `train.steps`, evaluating and saving on schedule.

        On SIGINT/SIGTERM (trainer/runtime/stopping.py) the rollout or evaluation under way is cut short
        and an update, weight sync or save under way finishes; StopAtSafePoint then leaves with
        the state between steps, for the caller to save.
        """
        train = self.recipe.train
        if resumed:  # the engine must serve the checkpoint's weights: this eval shows it
            await stoppable(self.run_eval(prefix="resume_eval"))
        # and this proves it (as at a fresh start): the references later syncs are checked against
        await stoppable(self.weight_sync.verify(self.engine.policy_version,
                                                "the weight check at the start" if not resumed else
                                                "the weight check after the resume"))
        self.weight_sync.take_metrics()
        missed = self.evals and self.evals[-1]["step"] < self.step and (  # a stop cut it short
            self.step % train.eval_every == 0 or self.step >= train.steps)
        if not self.evals or missed:
            await stoppable(self.run_eval())
        if self.step >= train.steps:
            console.print(f"already at step {self.step} of {train.steps}: nothing to train "
                          f"(raise train.steps to continue)")
        with progress_bar() as bar:
            last_acc = f"{self.evals[-1]['accuracy']:.0%}" if self.evals else "-"
            task = bar.add_task("train", total=train.steps, completed=self.step, reward=0.0,
                                accuracy=last_acc, tokens_per_s=0.0, busy="")
            self.ahead.start_window()
            while self.step < train.steps:
                if stop_requested():  # the update, sync or save the signal came in has finished
                    raise StopAtSafePoint()
                metrics = await self.train_step()
                if self.step % train.eval_every == 0 or self.step == train.steps:
                    last_acc = f"{(await stoppable(self.run_eval()))['eval/accuracy']:.0%}"
                if self.step % train.save_every == 0 or self.step == train.steps:
                    await self.save()
                self.ahead.start_window()  # evaluations and saves are not the pipeline's time
                bar.update(task, completed=self.step, reward=metrics["reward"], accuracy=last_acc,
                           tokens_per_s=metrics["tokens_per_s"],
                           busy=busy_text(metrics["pipeline/engine_busy"], metrics["pipeline/trainer_busy"]))
        return self.summary()

    def summary(self) -> dict[str, Any]:
        first, last = self.evals[0], self.evals[-1]
        return {"steps": self.step, "eval_accuracy_first": first["accuracy"],
                "eval_accuracy_last": last["accuracy"], "eval_reward_first": first["reward"],
                "eval_reward_last": last["reward"], "wall_seconds": round(self.train_seconds, 1),
                "eval_curve": self.evals, "bad_steps": self.bad_steps,
                "reward_failures": dict(self.rewards.failures),
                "dataset_dropped_rows": getattr(self.task, "dropped_rows", 0),
                "rollout_drops": dict(self.scheduler.ledger.drop_reasons())}


def transport_casts(engine: Any) -> bool:
    """The engine's weight transport casts to the served dtype bucket by bucket (the in-process
    engine's bucketed ipc): hand it the float32 masters, not a full cast copy held on the
    trainer's GPU for the whole push. Shared memory, nccl and Ray engines take the casts."""
    return bool(getattr(getattr(engine, "weight_transport", None), "casts_per_bucket", False))


def oldest_token_age(groups: list[Group], version: int) -> int:
    """Versions between the batch's oldest token and `version` (the one it is trained at)."""
    return max((group_age(g, version) for g in groups), default=0)


def group_metrics(groups: list[Group], filtered: int) -> dict[str, float]:
    """TRL-named reward and completion statistics of the step's groups.

    `reward_std` is TRL's: the sample standard deviation of all the batch's rewards.
    `frac_reward_zero_std` counts the groups dynamic sampling rejected (all rewards equal)
    among all the groups completed this step, as TRL's does for its (unfiltered) batch.
    """
    rewards = [r for g in groups for r in g.rewards]
    stds = [pstdev(g.rewards) for g in groups]  # only whether each is zero matters
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    truncated = [s.truncated for g in groups for s in g.samples]
    return {
        "reward": sum(rewards) / len(rewards),
        "reward_std": stdev(rewards) if len(rewards) > 1 else 0.0,
        "frac_reward_zero_std": (filtered + sum(math.isclose(s, 0.0) for s in stds)) / (filtered + len(stds)),
        "completions/mean_length": sum(lengths) / len(lengths),
        "completions/max_length": max(lengths),
        "completions/clipped_ratio": sum(truncated) / len(truncated),
    }
