"""TRL baseline for `bench/e2e_vs_trl.py`: GRPO with TRL's `GRPOTrainer` on the built-in task.

Trains `builtin:tiny-math` on the arithmetic task with the project's own task records and
reward function (`correctness_reward`), with settings matched to `rl-train`'s synchronous mode:
per optimizer step, N prompts x G completions, one optimizer update per generation batch, no KL,
GRPO loss (sequence mean, then batch mean), group-std-scaled advantages, constant learning rate,
gradient clipping at 1.0, no weight decay. Generation is HF `generate` (no vLLM: TRL's colocated
vLLM cannot load weights into the CPU build's repacked layers).

Held-out greedy accuracy is measured at step 0 and every `--eval-every` steps by a callback.
The train wall clock starts when the Trainer begins training (after imports, model load and
TRL's set-up) and excludes the time spent evaluating. Writes one JSON file.

    python bench/trl_baseline.py --steps 40 --groups-per-step 8 --group-size 8 \
        --max-tokens 48 --lr 2e-5 --eval-every 10 --out /tmp/trl.json

TRL 1.16 batch semantics, as used here: `per_device_train_batch_size` counts *completions*,
not prompts; the generation batch is `per_device_train_batch_size x steps_per_generation`
completions and `steps_per_generation` defaults to `gradient_accumulation_steps`. So
`per_device_train_batch_size = N*G`, `gradient_accumulation_steps = 1` gives exactly one
generation of N prompts x G completions per optimizer step (`global_step`), each prompt
repeated G times by TRL's RepeatSampler.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

MODEL = "builtin:tiny-math"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40,
                   help="optimizer steps (one generation batch each)")
    p.add_argument("--groups-per-step", type=int, default=8, help="prompts per step (N)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-tokens", type=int, default=48, help="max completion length")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    p.add_argument("--eval-size", type=int, default=128, help="held-out prompts")
    p.add_argument("--digits-min", type=int, default=1)
    p.add_argument("--digits-max", type=int, default=3)
    p.add_argument("--operands", type=int, default=2)
    p.add_argument("--task-seed", type=int, default=0, help="task stream seed (recipe task.seed)")
    p.add_argument("--seed", type=int, default=0, help="training seed (sampling, init of RNGs)")
    p.add_argument("--target-accuracy", type=float, default=None, help="stop once reached")
    p.add_argument("--max-seconds", type=float, default=None, help="cap on train wall seconds")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("bench/results/trl_baseline.json"))
    args = p.parse_args(argv)
    if args.group_size < 2:
        p.error("--group-size must be at least 2 (GRPO needs a group baseline)")
    if min(args.steps, args.groups_per_step, args.eval_every, args.eval_size, args.max_tokens) < 1:
        p.error("--steps, --groups-per-step, --eval-every, --eval-size, --max-tokens must be >= 1")
    return args


def machine_info() -> dict[str, Any]:
    """CPU model and core count of this machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def counting_reward(task, token_count: dict[str, int]):
    """The project's `correctness_reward`, adapted to TRL 1.16's call, counting completion tokens.

    Besides the dataset columns (lists, one value per completion), TRL passes `trainer_state`,
    `log_extra` and `log_metric`, which are not per-completion lists; the project's reward
    functions zip all their keyword columns together, so only list-valued columns pass through.
    TRL's `completion_ids` (generated ids up to and including EOS) give the token count.
    """
    from rollover.tasks.rewards import correctness_reward

    score = correctness_reward(task)

    def correctness(prompts: list[str], completions: list[str], completion_ids=None,
                    **kwargs: Any) -> list[float | None]:
        if completion_ids is not None:
            token_count["completion_tokens"] += sum(len(ids) for ids in completion_ids)
        columns = {k: v for k, v in kwargs.items()
                   if isinstance(v, list) and len(v) == len(completions)}
        return score(prompts, completions, **columns)

    return correctness


def main(argv: list[str] | None = None) -> dict[str, Any]:
    process_started = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # TRL warns at import about the installed vLLM version; this baseline does not use vLLM.
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rollover.tasks.registry import ArithmeticTask
    from rollover.trainer.builtin_model import greedy_accuracy, resolve_model_path

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    n, g = args.groups_per_step, args.group_size
    task = ArithmeticTask(args.task_seed, args.digits_min, args.digits_max, args.operands, True)
    # One row per prompt the run will draw, in the task's order (TRL's shuffling is off, so TRL
    # sees task.record(0), record(1), ... as rl-train's dataset cursor does).
    rows = [task.record(i) for i in range(args.steps * n)]
    train = datasets.Dataset.from_list([{"prompt": r["question"], **r} for r in rows])
    held_out = task.eval_records(args.eval_size)

    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    out_dir = tempfile.mkdtemp(prefix="trl_baseline_")  # Trainer wants one; nothing is saved
    config = GRPOConfig(
        output_dir=out_dir,
        # batch: N*G completions per micro-batch, one micro-batch per optimizer step,
        # one generation per optimizer step (steps_per_generation = grad accumulation = 1)
        per_device_train_batch_size=n * g,
        gradient_accumulation_steps=1,
        num_generations=g,
        num_iterations=1,
        max_steps=args.steps,
        max_completion_length=args.max_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        # algorithm: GRPO, no KL, group-normalised advantages, symmetric clip 0.2
        loss_type="grpo",
        beta=0.0,
        scale_rewards="group",
        epsilon=0.2,
        # optimizer: matches rl-train's defaults (AdamW, constant lr, no warm-up, clip 1.0)
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
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

    clock = EvalClock(args, tokenizer, held_out, greedy_accuracy, token_count)
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
            "model": MODEL, "steps": args.steps, "steps_done": steps_done,
            "groups_per_step": n, "group_size": g, "completions_per_step": n * g,
            "max_tokens": args.max_tokens, "lr": args.lr, "temperature": args.temperature,
            "eval_every": args.eval_every, "eval_size": args.eval_size,
            "task": {"name": "arithmetic", "seed": args.task_seed, "digits_min": args.digits_min,
                     "digits_max": args.digits_max, "operands": args.operands, "scratchpad": True},
            "seed": args.seed, "target_accuracy": args.target_accuracy,
            "max_seconds": args.max_seconds, "threads": args.threads,
            "trl": {"per_device_train_batch_size": config.per_device_train_batch_size,
                    "gradient_accumulation_steps": config.gradient_accumulation_steps,
                    "generation_batch_size": config.generation_batch_size,
                    "steps_per_generation": config.steps_per_generation,
                    "num_generations": config.num_generations,
                    "num_iterations": config.num_iterations, "loss_type": config.loss_type,
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
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    first, last = clock.curve[0]["accuracy"], clock.curve[-1]["accuracy"]
    print(f"trl: {steps_done} steps, {result['seconds_per_step']} s/step "
          f"(median {result['median_seconds_per_step']}), "
          f"{result['completion_tokens_per_second']} completion tok/s, "
          f"accuracy {first:.3f} -> {last:.3f}; wrote {args.out}", file=sys.stderr)
    return result


class EvalClock(TrainerCallback):
    """Held-out evaluation at step 0 and every `eval_every` steps (and after the last), with a
    wall clock that excludes evaluation time; stops on the target accuracy or the time cap."""

    def __init__(self, args: argparse.Namespace, tokenizer, held_out: list[dict],
                 accuracy_fn, token_count: dict[str, int]):
        self.args, self.tokenizer, self.held_out = args, tokenizer, held_out
        self.accuracy_fn, self.token_count = accuracy_fn, token_count
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
        accuracy = self.accuracy_fn(model, self.tokenizer, self.held_out, self.args.max_tokens)
        model.train(was_training)
        self.eval_seconds += time.perf_counter() - begin
        self.curve.append({"step": step, "wall_seconds": round(wall, 3), "accuracy": accuracy,
                           "completion_tokens": self.token_count["completion_tokens"]})
        target = self.args.target_accuracy
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
        if step % self.args.eval_every == 0 or step >= state.max_steps:
            self.evaluate(model, step)
            if self.reached_target_seconds is not None:
                control.should_training_stop = True
        cap = self.args.max_seconds
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
