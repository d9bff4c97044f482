"""`rl-train RECIPE [key.sub=value ...] [--print-config]`: the command users run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rollover.tasks.errors import EXIT_FAILED
from rollover.trainer.config import Recipe, RecipeError, load_recipe, to_yaml
from rollover.trainer.runtime.console import finish_capture, start_capture
from rollover.trainer.runtime.stopping import GracefulStop, StopRequested, exit_code


def check_paths(recipe: Recipe) -> None:
    """Fail fast, before any heavy work, on local paths that do not exist."""
    model_path = recipe.model.path
    looks_local = model_path.startswith(("/", "./", "../", "~")) or Path(model_path).exists()
    if looks_local and not Path(model_path).expanduser().is_dir():
        raise RecipeError(f"model.path: model folder not found: {model_path}")
    if recipe.task.name == "dataset":
        from rollover.tasks.registry import TaskError, data_path  # `builtin:` names a shipped file

        try:
            found = Path(data_path(recipe.task.path)).expanduser().exists()
        except TaskError as exc:
            raise RecipeError(str(exc)) from None
        if not found:
            raise RecipeError(f"task.path: dataset not found: {recipe.task.path}")
    resume = recipe.train.resume
    if isinstance(resume, str) and not Path(resume).expanduser().is_dir():
        raise RecipeError(f"train.resume: checkpoint not found: {resume}")
    from rollover.trainer.tracking import has_wandb_key

    if recipe.tracking.wandb == "online" and not has_wandb_key():
        raise RecipeError("tracking.wandb=online needs a W&B API key (set WANDB_API_KEY or run "
                          "`wandb login`); or use tracking.wandb=auto, which runs offline without one")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rl-train", description="RL post-training (GRPO/DAPO/GSPO) with Active Partial Rollouts.")
    parser.add_argument("recipe", nargs="?", help="a YAML recipe, e.g. recipes/grpo_math.yaml")
    parser.add_argument("overrides", nargs="*", help="optional key.sub=value overrides, e.g. train.steps=20")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the engine's and libraries' output on the console "
                             "(it always goes to rl-train.log in the run folder)")
    args = parser.parse_args(argv)
    if args.recipe is None:  # argparse would call the optional overrides required too
        parser.error("a recipe is required, e.g. rl-train recipes/grpo_math.yaml [key.sub=value ...]")
    # `resume=PATH` is short for train.resume=PATH.
    args.overrides = [f"train.{o}" if o.startswith("resume=") else o for o in args.overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_config:  # no path checks: a GPU recipe's data may live elsewhere
            print(to_yaml(recipe), end="")
            return 0
        check_paths(recipe)
    except RecipeError as exc:
        print(f"rl-train: error: {exc}", file=sys.stderr)
        return exc.exit_status
    # The engine's log goes to rl-train.log, not the console: keep its startup and reload lines
    # there. (Its warning at every weight reload, "RotaryEmbedding: Failed to load weights", is
    # harmless: a layer with no checkpoint weights, restored as is.)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    # Third-party output, the heavy modules' import-time notices included, goes to the log file.
    start_capture(verbose=args.verbose)
    # SIGINT/SIGTERM stop gracefully from here on (a Ctrl-C during the heavy imports included);
    # run_training reuses this handler.
    GracefulStop().install()
    status = EXIT_FAILED
    try:
        from rollover.trainer.run import run_training  # heavy imports only when training

        status = run_training(recipe, recipe_path=args.recipe)
    except StopRequested as exc:  # stopped before the run began: nothing to save
        status = exit_code(exc.signum)
    finally:
        finish_capture(failed=status == EXIT_FAILED)
    return status


if __name__ == "__main__":
    sys.exit(main())
