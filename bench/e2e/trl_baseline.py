"""TRL baseline for `bench/e2e/e2e_vs_trl.py`: GRPO with TRL's `GRPOTrainer` on a recipe's task.

Reads the same recipe as `rl-train` (with the same `key.sub=value` overrides) and takes from it
the model (`model.path`, `model.max_model_len`), the task (every `task.*` key, built by the
project's own task registry, with its reward function `correctness_reward`; `task.prompt_format:
chat` rows are conversational, so TRL renders the model's chat template as rl-train does), the batch shape
(`rollout.groups_per_step` N, `rollout.group_size` G), `rollout.max_tokens`, `temperature`,
`top_p`, the step budget and evaluation schedule (`train.steps`, `train.eval_every`,
`task.eval_size`) and the optimizer and loss settings (`train.lr`, `warmup_steps`, `schedule`,
`weight_decay`, `grad_clip`; `algo.loss`, `clip_low`/`clip_high`, `kl_coef`, advantage scaling,
`mask_truncated`). Settings matched to `rl-train`'s synchronous mode: one optimizer update per
generation batch of N prompts x G completions. rl-train's dynamic sampling and off-policy
correction have no TRL counterpart here (TRL's is vLLM-only). Generation is HF `generate` (no
vLLM: TRL's colocated vLLM cannot load weights into the CPU build's repacked layers).

Held-out greedy accuracy is measured at step 0 and every `train.eval_every` steps by a callback.
The train wall clock starts when the Trainer begins training (after imports, model load and
TRL's set-up) and excludes the time spent evaluating. Writes one JSON file.

    python -m bench.e2e.trl_baseline --recipe recipes/grpo_math.yaml --seed 0 --out /tmp/trl.json \
        train.steps=40 rollout.group_size=8 task.eval_size=128

The older flags (`--steps`, `--groups-per-step`, `--group-size`, `--max-tokens`, `--lr`, ...)
still work and override the recipe.

TRL 1.16 batch semantics, as used here: `per_device_train_batch_size` counts *completions*,
not prompts; the generation batch is `per_device_train_batch_size x steps_per_generation`
completions and `steps_per_generation` defaults to `gradient_accumulation_steps`. So
`per_device_train_batch_size = N*G`, `gradient_accumulation_steps = 1` gives exactly one
generation of N prompts x G completions per optimizer step (`global_step`), each prompt
repeated G times by TRL's RepeatSampler.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from bench.common import RESULTS, ROOT, machine, save_json

DEFAULT_RECIPE = ROOT / "recipes/grpo_math.yaml"
# The older flags, each a shorthand for one recipe key.
FLAG_KEYS = {
    "steps": "train.steps", "groups_per_step": "rollout.groups_per_step",
    "group_size": "rollout.group_size", "max_tokens": "rollout.max_tokens", "lr": "train.lr",
    "temperature": "rollout.temperature", "eval_every": "train.eval_every",
    "eval_size": "task.eval_size", "digits_min": "task.digits_min", "digits_max": "task.digits_max",
    "operands": "task.operands", "task_seed": "task.seed",
}
# rl-train's algo.loss -> TRL's (loss_type, importance_sampling_level).
TRL_LOSSES = {"grpo": ("grpo", "token"), "dapo": ("dapo", "token"), "dr_grpo": ("dr_grpo", "token"),
              "bnpo": ("bnpo", "token"), "gspo": ("grpo", "sequence")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides, as rl-train takes them")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the rl-train recipe to match")
    for flag, key in FLAG_KEYS.items():
        kind = float if key in ("train.lr", "rollout.temperature") else int
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, help=f"sets {key}")
    p.add_argument("--seed", type=int, default=0, help="training seed (sampling, init of RNGs)")
    p.add_argument("--target-accuracy", type=float, default=None, help="stop once reached")
    p.add_argument("--max-seconds", type=float, default=None, help="cap on train wall seconds")
    # Generation and the update run one after the other in this one process: all cores for torch.
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=RESULTS / "trl_baseline.json")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace):
    """The recipe with the overrides and the older flags applied; exits with one line on a mistake."""
    from rollover.trainer.config import RecipeError, load_recipe

    flags = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items()
             if getattr(args, flag) is not None]
    try:
        recipe = load_recipe(args.recipe, [*args.overrides, *flags])
    except RecipeError as exc:
        sys.exit(f"trl_baseline: {exc}")
    if recipe.rollout.group_size < 2:
        sys.exit("trl_baseline: rollout.group_size must be at least 2 (GRPO needs a group baseline)")
    if recipe.task.name not in ("arithmetic", "dataset"):
        sys.exit(f"trl_baseline: task.name '{recipe.task.name}' is not supported here "
                 "(arithmetic or dataset: tasks whose records TRL can hold as dataset rows)")
    if recipe.algo.loss not in TRL_LOSSES:
        sys.exit(f"trl_baseline: algo.loss '{recipe.algo.loss}' has no TRL counterpart here "
                 f"(known: {', '.join(TRL_LOSSES)})")
    return recipe


def trl_prompt(record: dict, task_cfg) -> str | list[dict[str, str]]:
    """The dataset row's `prompt` as TRL takes it: the text rl-train's `raw` prompt encodes, or
    for `chat` the messages TRL renders through the model's chat template (what rl-train renders)."""
    if task_cfg.prompt_format == "raw":
        return (task_cfg.system_prompt + "\n" if task_cfg.system_prompt else "") + record["question"]
    system = [{"role": "system", "content": task_cfg.system_prompt}] if task_cfg.system_prompt else []
    return [*system, {"role": "user", "content": record["question"]}]


def completion_text(completion: str | list[dict[str, str]]) -> str:
    """A completion as text: TRL hands conversational completions as [{"role": "assistant", ...}]."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def completion_budget(recipe, prompts: list[list[int]]) -> int:
    """rollout.max_tokens, lowered so the longest prompt plus its answer fits model.max_model_len.

    rl-train's engine never runs past max_model_len; HF generate would, so TRL gets the same cap.
    """
    longest = max(len(ids) for ids in prompts)
    return max(1, min(recipe.rollout.max_tokens, recipe.model.max_model_len - longest))


def held_out_accuracy(model, tokenizer, prompts: list[list[int]], records: list[dict], task,
                      max_new_tokens: int) -> float:
    """Greedy accuracy by the task's own verifier, as rl-train's evaluation scores it: the same
    prompt ids (trainer prompts), left-padded for HF generate, decoded without special tokens."""
    import torch

    width, pad = max(len(p) for p in prompts), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(task.score(t, r) for t, r in zip(texts, records)) / len(records)


def counting_reward(task, token_count: dict[str, int]):
    """The project's `correctness_reward`, adapted to TRL 1.16's call, counting completion tokens.

    Besides the dataset columns (lists, one value per completion), TRL passes `trainer_state`,
    `log_extra` and `log_metric`, which are not per-completion lists; the project's reward
    functions zip all their keyword columns together, so only list-valued columns pass through.
    TRL's `completion_ids` (generated ids up to and including EOS) give the token count.
    """
    from rollover.tasks.rewards import correctness_reward

    score = correctness_reward(task)

    def correctness(prompts: list, completions: list, completion_ids=None,
                    **kwargs: Any) -> list[float | None]:
        if completion_ids is not None:
            token_count["completion_tokens"] += sum(len(ids) for ids in completion_ids)
        columns = {k: v for k, v in kwargs.items()
                   if isinstance(v, list) and len(v) == len(completions)}
        return score(prompts, [completion_text(c) for c in completions], **columns)

    return correctness


def main(argv: list[str] | None = None) -> dict[str, Any]:
    process_started = time.perf_counter()
    args = parse_args(argv)
    recipe = load_settings(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # TRL warns at import about the installed vLLM version; this baseline does not use vLLM.
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rollover.tasks.prompts import prompt_ids
    from rollover.tasks.registry import build_task
    from rollover.trainer.builtin.models import resolve_model_path
    from rollover.trainer.config import resolve_dtype

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    rollout, train_cfg, algo = recipe.rollout, recipe.train, recipe.algo
    n, g, steps = rollout.groups_per_step, rollout.group_size, train_cfg.steps
    task = build_task(recipe.task)  # every task.* key, as rl-train builds it
    # One row per prompt the run will draw, in the task's order (TRL's shuffling is off, so TRL
    # sees task.record(0), record(1), ... as rl-train's dataset cursor does).
    rows = [task.record(i) for i in range(steps * n)]
    train = datasets.Dataset.from_list([{**r, "prompt": trl_prompt(r, recipe.task)} for r in rows])
    held_out = task.eval_records(recipe.task.eval_size)

    path = resolve_model_path(recipe.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = resolve_dtype(recipe.model.dtype, has_cuda=False)  # TRL runs on the CPU here
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))

    def encode(record: dict) -> list[int]:
        return prompt_ids(record, tokenizer, recipe.task.prompt_format, recipe.task.system_prompt)

    held_out_prompts = [encode(r) for r in held_out]
    max_tokens = completion_budget(recipe, [encode(r) for r in rows] + held_out_prompts)

    def accuracy_fn(model, _tokenizer, records: list[dict], max_new_tokens: int) -> float:
        return held_out_accuracy(model, tokenizer, held_out_prompts, records, task, max_new_tokens)
    loss_type, sampling_level = TRL_LOSSES[algo.loss]

    out_dir = tempfile.mkdtemp(prefix="trl_baseline_")  # Trainer wants one; nothing is saved
    config = GRPOConfig(
        output_dir=out_dir,
        # batch: N*G completions per micro-batch, one micro-batch per optimizer step,
        # one generation per optimizer step (steps_per_generation = grad accumulation = 1)
        per_device_train_batch_size=n * g,
        gradient_accumulation_steps=1,
        num_generations=g,
        num_iterations=1,
        max_steps=steps,
        max_completion_length=max_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=0,
        shuffle_dataset=False,
        # algorithm: the recipe's loss, KL coefficient, advantage scaling and clip range
        loss_type=loss_type,
        importance_sampling_level=sampling_level,
        beta=algo.kl_coef,
        scale_rewards=recipe.advantage_std,
        epsilon=algo.clip_low,
        epsilon_high=algo.clip_high,
        mask_truncated_completions=algo.mask_truncated,
        # optimizer: the recipe's (AdamW, constant or cosine lr with warm-up, gradient clipping)
        learning_rate=train_cfg.lr,
        lr_scheduler_type="cosine" if train_cfg.schedule == "cosine" else "constant_with_warmup",
        warmup_steps=train_cfg.warmup_steps,
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.grad_clip,
        # runtime: CPU, float32, HF generate, no logging backends, no checkpoints
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    assert config.generation_batch_size == n * g and config.steps_per_generation == 1, (
        config.generation_batch_size, config.steps_per_generation)

    token_count = {"completion_tokens": 0}
    reward = counting_reward(task, token_count)

    clock = EvalClock(tokenizer, held_out, accuracy_fn, token_count, eval_every=train_cfg.eval_every,
                      max_tokens=max_tokens, target=args.target_accuracy, max_seconds=args.max_seconds)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config,
                          train_dataset=train, processing_class=tokenizer, callbacks=[clock])
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    steps_done = trainer.state.global_step
    train_seconds = clock.train_seconds()
    if clock.curve[-1]["step"] != steps_done:  # stopped between evaluation points
        clock.evaluate(trainer.model, steps_done)
    result = {
        "system": "trl",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "config": {
            "recipe": str(args.recipe), "overrides": args.overrides, "model": recipe.model.path,
            "dtype": dtype, "steps": steps, "steps_done": steps_done,
            "groups_per_step": n, "group_size": g, "completions_per_step": n * g,
            "max_tokens": rollout.max_tokens, "max_tokens_effective": max_tokens, "lr": train_cfg.lr,
            "temperature": rollout.temperature, "eval_every": train_cfg.eval_every,
            "eval_size": recipe.task.eval_size, "task": recipe.task.model_dump(mode="json"),
            "seed": args.seed, "target_accuracy": args.target_accuracy,
            "max_seconds": args.max_seconds, "threads": args.threads,
            "trl": {"per_device_train_batch_size": config.per_device_train_batch_size,
                    "gradient_accumulation_steps": config.gradient_accumulation_steps,
                    "generation_batch_size": config.generation_batch_size,
                    "steps_per_generation": config.steps_per_generation,
                    "num_generations": config.num_generations,
                    "num_iterations": config.num_iterations, "loss_type": config.loss_type,
                    "importance_sampling_level": config.importance_sampling_level,
                    "epsilon": config.epsilon, "epsilon_high": config.epsilon_high,
                    "beta": config.beta, "scale_rewards": config.scale_rewards,
                    "lr_scheduler_type": getattr(config.lr_scheduler_type, "value",
                                                 str(config.lr_scheduler_type)),
                    "max_grad_norm": config.max_grad_norm, "use_vllm": config.use_vllm},
        },
        "curve": clock.curve,
        "train_log": clock.train_log,
        "train_wall_seconds": round(train_seconds, 3),
        "eval_seconds": round(clock.eval_seconds, 3),
        "total_wall_seconds": round(time.perf_counter() - clock.started, 3),  # train + eval
        "process_wall_seconds": round(time.perf_counter() - process_started, 3),  # + startup
        "completion_tokens": token_count["completion_tokens"],
        "seconds_per_step": round(train_seconds / max(steps_done, 1), 4),
        "completion_tokens_per_second": round(
            token_count["completion_tokens"] / max(train_seconds, 1e-9), 2),
        # robust to spikes when other processes share the CPU
        "median_seconds_per_step": round(statistics.median(clock.step_seconds), 4)
        if clock.step_seconds else None,
        "step_seconds": clock.step_seconds,
        "reached_target_seconds": clock.reached_target_seconds,
        "machine": machine(),
    }
    save_json(result, args.out)
    first, last = clock.curve[0]["accuracy"], clock.curve[-1]["accuracy"]
    print(f"trl: {steps_done} steps, {result['seconds_per_step']} s/step "
          f"(median {result['median_seconds_per_step']}), "
          f"{result['completion_tokens_per_second']} completion tok/s, "
          f"accuracy {first:.3f} -> {last:.3f}; wrote {args.out}", file=sys.stderr)
    return result


class EvalClock(TrainerCallback):
    """Held-out evaluation at step 0 and every `eval_every` steps (and after the last), with a
    wall clock that excludes evaluation time; stops on the target accuracy or the time cap."""

    def __init__(self, tokenizer, held_out: list[dict], accuracy_fn, token_count: dict[str, int], *,
                 eval_every: int, max_tokens: int, target: float | None, max_seconds: float | None):
        self.tokenizer, self.held_out = tokenizer, held_out
        self.accuracy_fn, self.token_count = accuracy_fn, token_count
        self.eval_every, self.max_tokens = eval_every, max_tokens
        self.target, self.max_seconds = target, max_seconds
        self.started = time.perf_counter()
        self.eval_seconds = 0.0
        self.curve: list[dict[str, Any]] = []
        self.train_log: list[dict[str, Any]] = []
        self.reached_target_seconds: float | None = None
        self.step_seconds: list[float] = []  # train-only wall seconds of each optimizer step
        self._last_step_end = 0.0

    def train_seconds(self) -> float:
        """Wall seconds since training began, minus the time spent evaluating."""
        return time.perf_counter() - self.started - self.eval_seconds

    def evaluate(self, model, step: int) -> float:
        """Greedy held-out accuracy; appends a curve point stamped with train-only seconds."""
        wall = self.train_seconds()
        begin = time.perf_counter()
        was_training = model.training
        model.eval()
        accuracy = self.accuracy_fn(model, self.tokenizer, self.held_out, self.max_tokens)
        model.train(was_training)
        self.eval_seconds += time.perf_counter() - begin
        self.curve.append({"step": step, "wall_seconds": round(wall, 3), "accuracy": accuracy,
                           "completion_tokens": self.token_count["completion_tokens"]})
        target = self.target
        if target is not None and self.reached_target_seconds is None and accuracy >= target:
            self.reached_target_seconds = round(wall, 3)
        print(f"trl: step {step} train {wall:.1f}s held-out greedy accuracy {accuracy:.3f}",
              file=sys.stderr, flush=True)
        return accuracy

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.started = time.perf_counter()
        self.eval_seconds = 0.0
        self.evaluate(model, 0)
        self._last_step_end = self.train_seconds()
        if self.reached_target_seconds is not None:  # the warm start already meets the target
            control.should_training_stop = True  # (the Trainer honours it after one step)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        now = self.train_seconds()
        self.step_seconds.append(round(now - self._last_step_end, 4))
        self._last_step_end = now
        if step % self.eval_every == 0 or step >= state.max_steps:
            self.evaluate(model, step)
            if self.reached_target_seconds is not None:
                control.should_training_stop = True
        cap = self.max_seconds
        if cap is not None and self.train_seconds() >= cap:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            keep = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                    "completions/clipped_ratio", "entropy", "grad_norm", "step_time")
            self.train_log.append({"step": state.global_step,
                                   **{k: round(float(logs[k]), 5) for k in keep if k in logs}})


if __name__ == "__main__":
    main()
