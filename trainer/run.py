"""`run_training`: build the parts a recipe names, train, and write the run's summary."""

from __future__ import annotations

import asyncio
import json
import random
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from rollover.rollout.cluster import disconnect, start_engines
from rollover.swarm.node import SwarmNode
from rollover.tasks.errors import RolloverError, UsageError
from rollover.tasks.registry import build_task
from rollover.tasks.rewards import RewardRunner
from rollover.trainer.runtime import failpoints, watchdog
from rollover.trainer.build import build_trainer, engine_settings
from rollover.trainer.checkpoint import (checkpoint_problem, find_checkpoint, latest_checkpoint,
                                         recover_interrupted_save)
from rollover.trainer.config import Recipe, RecipeError, load_recipe, to_yaml
from rollover.trainer.runtime.cpu_split import bind_engine, pin_trainer, recipe_threads
from rollover.trainer.runtime.console import LOG_FILE, error_line, log_to
from rollover.trainer.runtime.heap import tune_collector
from rollover.trainer.loop import Trainer
from rollover.trainer.policy import ModelLoadError, Policy
from rollover.trainer.runtime.resume_check import check_resume, recipe_changes
from rollover.trainer.runtime.run_folder import RunFolder, rewind_step_logs
from rollover.trainer.runtime.stopping import (
    GracefulStop, RunStopped, StopAtSafePoint, StopRequested, call_with_sigint_blocked, current, exit_code,
    stoppable)
from rollover.trainer.tracking import Tracker, console


def output_dir_for(recipe: Recipe, recipe_path: str) -> Path:
    if recipe.train.output_dir:
        return Path(recipe.train.output_dir).expanduser()
    return Path("runs") / f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_point(recipe: Recipe, output_dir: Path) -> Path | None:
    """The checkpoint to continue from: a given path, or the latest in the run folder."""
    resume = recipe.train.resume
    if isinstance(resume, str):
        given = Path(resume).expanduser()
        problem = checkpoint_problem(given) if given.is_dir() else "no such folder"
        if problem:  # the manifest check a resume from the run folder makes, for a named one too
            raise UsageError(f"train.resume: {given} is not a complete checkpoint ({problem})")
        return given
    if resume:
        for step in recover_interrupted_save(output_dir):
            console.print(f"checkpoint {step.name}: restored from before an interrupted save")
        found, skipped = find_checkpoint(output_dir)
        for damaged, problem in skipped:
            console.print(f"[yellow]warning: skipping damaged checkpoint {damaged} ({problem})")
        if found is None:  # the earlier attempt's step lines would precede this run's own
            cleared = [name for name, lines in rewind_step_logs(output_dir, -1).items() if lines]
            note = f" (cleared the earlier attempt's {', '.join(cleared)})" if cleared else ""
            console.print(f"train.resume: no checkpoint in {output_dir}; starting fresh{note}")
        return found
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_training(recipe: Recipe, recipe_path: str) -> int:
    """Train as the recipe says; returns the process exit status."""
    output_dir = output_dir_for(recipe, recipe_path)
    if isinstance(recipe.train.resume, str) and not recipe.train.output_dir:
        output_dir = Path(recipe.train.resume).expanduser().resolve().parent.parent
    folder = RunFolder(output_dir)
    try:
        folder.claim(resuming=bool(recipe.train.resume))
    except RolloverError as exc:
        return _error(exc)
    log_to(output_dir / LOG_FILE)  # third-party output (the engine's too) from here on
    stop = current() or GracefulStop().install()  # SIGINT/SIGTERM: see trainer/runtime/stopping.py
    watchdog.start(stderr=getattr(console, "file", None))  # before the engine: it dies with us
    try:
        return _run_in_folder(recipe, recipe_path, folder, stop)
    except StopRequested as exc:  # before training started: nothing to save
        watchdog.stop_descendants()  # a half-started engine (multiprocessing joins it at exit)
        error_line(f"rl-train: stopped by {exc} before training started; "
                   f"{_resume_hint(recipe, recipe_path, output_dir)}")
        return exit_code(exc.signum)
    finally:
        stop.phase = "finishing"
        folder.release()
        watchdog.clean_end()


def _run_in_folder(recipe: Recipe, recipe_path: str, folder: RunFolder, stop: GracefulStop) -> int:
    """The run, in its claimed folder; returns the exit status."""
    output_dir = folder.folder
    console.print(f"run folder: {output_dir}")
    seed_everything(recipe.train.seed)
    learner = None  # with train.world_size > 1: rank 0's handle on every trainer rank
    if not torch.cuda.is_available():
        torch.set_num_threads(recipe_threads(recipe))
    try:
        checkpoint = resume_point(recipe, output_dir)
        if checkpoint is not None:
            for key, (before, after) in check_resume(output_dir, recipe.model_dump(mode="json")).items():
                console.print(f"resuming with {key} changed: {before} -> {after}")
        task = build_task(recipe.task)
        rewards = RewardRunner.from_config(recipe.task, task)
        policy = Policy(recipe.model, recipe.train.lora)
        if checkpoint is not None:
            load_checkpoint_weights(policy, checkpoint)
        if recipe.train.world_size > 1:  # the other trainer ranks load while the engine starts
            from rollover.trainer.distributed.launch import start_ranks
            learner = start_ranks(policy, recipe)
        # The engine starts from the checkpoint's weights when resuming, never the pre-resume ones.
        settings = engine_settings(recipe.model, recipe.rollout,
                                   model=str(checkpoint) if checkpoint else policy.path)
        trainer_cores = engine_cores(recipe)
        # SIGINT blocked: the engine's processes ignore a terminal's Ctrl-C (rl-train stops them).
        engine = call_with_sigint_blocked(lambda: start_engines(settings, recipe.cluster))
    except RolloverError as exc:  # each carries its exit status (tasks/errors.py)
        disconnect()
        if learner is not None:
            learner.close()
        return _error(exc)
    if trainer_cores:
        pin_trainer(trainer_cores)
    folder.started()
    (output_dir / "recipe.yaml").write_text(to_yaml(recipe))
    trainer = None
    try:
        tracker = Tracker(recipe.tracking, output_dir, recipe.model_dump(mode="json"), output_dir.name)
        swarm = SwarmNode(recipe.swarm, task, recipe.rollout.group_size, output_dir,
                          recipe.train.seed) if recipe.swarm.enabled else None
        trainer = build_trainer(recipe, task, rewards, policy, engine, tracker, output_dir, swarm, learner)
        failpoints.arm(trainer)  # ROLLOVER_FAILPOINT (the kill test) only
        tune_collector("rl-train")  # full collections skip what lives as long as the run
        stop.phase = "training"
        summary = asyncio.run(_train(trainer, checkpoint))
        stop.phase = "finishing"
    except RunStopped as exc:
        error_line(f"rl-train: stopped by {stop.name} at step {exc.step}; checkpoint {exc.checkpoint} "
                   f"written; continue with: {resume_command(recipe, recipe_path, output_dir)}")
        return exit_code(stop.signum)
    except Exception as exc:
        if not isinstance(exc, RolloverError) and not stop.requested:
            raise
        step = trainer.step if trainer is not None else 0
        why = f"stopped by {stop.name} at step {step} ({_first_line(exc)})" if stop.requested else \
            f"stopped at step {step}: {_first_line(exc)}"
        error_line(f"rl-train: {why}; {_resume_hint(recipe, recipe_path, output_dir)}")
        return exit_code(stop.signum) if stop.requested else exc.exit_status
    finally:
        stop.phase = "finishing"
        if trainer is not None:
            trainer.scheduler.close()
        if learner is not None:
            learner.close()
        engine.shutdown()
        disconnect()
        rewards.close()  # the reward workers (atexit would too; this is at a known moment)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tracker.finish({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    first, last = summary["eval_accuracy_first"], summary["eval_accuracy_last"]
    console.print(f"[bold]done[/]: {summary['steps']} steps in {summary['wall_seconds']:.0f} s; "
                  f"held-out greedy accuracy {first:.1%} -> {last:.1%} ({(last - first) * 100:+.1f} points); "
                  f"summary in {output_dir / 'summary.json'}")
    return 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _error(exc: RolloverError) -> int:
    """Print the first line of `exc` as rl-train's one-line error; return its exit status."""
    error_line(f"rl-train: error: {_first_line(exc)}")
    return exc.exit_status


def engine_cores(recipe: Recipe) -> set[int] | None:
    """On a CPU-only host with `rollout.engine_cpus`: bind the engine to those cores and return
    the ones left for the trainer (pinned once the engine runs); None otherwise."""
    if not recipe.rollout.engine_cpus or torch.cuda.is_available():
        return None
    try:
        return bind_engine(recipe.rollout.engine_cpus)
    except ValueError as exc:
        raise UsageError(f"rollout.engine_cpus: {exc}") from None


def resume_command(recipe: Recipe, recipe_path: str, output_dir: Path) -> str:
    """The command that continues this run: the recipe, the overrides it was given, resume."""
    try:
        changed = recipe_changes(load_recipe(recipe_path).model_dump(mode="json"),
                                 recipe.model_dump(mode="json"))
    except RecipeError:  # the recipe file changed or went away meanwhile
        changed = {}
    overrides = [f"{key}={_override_value(value)}" for key, (_, value) in changed.items()]
    words = ["rl-train", recipe_path, *overrides, f"train.output_dir={output_dir}", "train.resume=true"]
    return " ".join(shlex.quote(str(w)) for w in words)


def _override_value(value: object) -> str:
    """`value` as an override's right-hand side, which is parsed back as YAML."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


def _resume_hint(recipe: Recipe, recipe_path: str, output_dir: Path) -> str:
    """Where the run can continue from, as one clause."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return "no checkpoint was written"
    return (f"last checkpoint {checkpoint} is intact (continue with: "
            f"{resume_command(recipe, recipe_path, output_dir)})")


async def _train(trainer: Trainer, checkpoint: Path | None) -> dict:
    """Restore, train; a stop at a safe point saves the state between steps (RunStopped)."""
    swarm = trainer.swarm
    try:
        if swarm is not None:
            await stoppable(swarm.start())
            console.print(f"swarm: joined as peer {swarm.sender}; others join with "
                          f"--peers {' '.join(swarm.maddrs())}")
        if checkpoint is not None:
            await trainer.restore(checkpoint)
            console.print(f"resumed from {checkpoint} at step {trainer.step}")
        return await trainer.train(resumed=checkpoint is not None)
    except StopAtSafePoint:
        raise RunStopped(trainer.step, await trainer.save()) from None
    finally:
        if swarm is not None:
            await swarm.close()


def load_checkpoint_weights(policy: Policy, checkpoint: Path) -> None:
    """Put the checkpoint's trained weights into the freshly built policy."""
    from safetensors.torch import load_file

    if policy.lora:
        from peft import set_peft_model_state_dict
        adapter = checkpoint / "adapter"
        set_peft_model_state_dict(policy.model, load_file(str(adapter / "adapter_model.safetensors")))
        return
    state = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = policy.model.load_state_dict(state, strict=False)
    real_missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if real_missing or unexpected:
        raise ModelLoadError(f"checkpoint {checkpoint}: weights do not match the model "
                             f"(missing {real_missing[:3]}, unexpected {unexpected[:3]})")
