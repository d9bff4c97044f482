"""The task registry: each task yields deterministic records and scores completions.

A record is a dict with at least `question`, `answer` and `spec`; `spec` is everything needed
to regenerate the record elsewhere (a resumed run, a swarm peer), and never the reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from rollover.tasks import arithmetic


class TaskError(ValueError):
    """A task that cannot be built from its settings (missing file, unknown name, bad columns)."""


class Task(Protocol):
    name: str

    def record(self, index: int) -> dict[str, Any]:
        """Training record `index` (deterministic; datasets cycle through epochs)."""

    def eval_records(self, count: int) -> list[dict[str, Any]]:
        """Held-out records, disjoint from training records."""

    def score(self, completion: str, record: dict[str, Any]) -> float:
        """Correctness in [0, 1] of `completion` against the task's own answer."""


class ArithmeticTask:
    """Built-in multi-operand addition with a scratchpad (see tasks/arithmetic.py)."""

    name = "arithmetic"

    def __init__(self, seed: int, digits_min: int, digits_max: int, operands: int, scratchpad: bool):
        self.seed, self.scratchpad = seed, scratchpad
        self.digits_min, self.digits_max, self.operands = digits_min, digits_max, operands

    def _record(self, seed: int, index: int) -> dict[str, Any]:
        return arithmetic.arithmetic_record(seed, index, self.digits_min, self.digits_max,
                                            self.operands, self.scratchpad)

    def record(self, index: int) -> dict[str, Any]:
        return self._record(self.seed, index)

    def eval_records(self, count: int) -> list[dict[str, Any]]:
        # A separate stream; a 1-digit problem may coincide with a training one, as in any
        # finite problem space, but the streams are independent draws.
        return [self._record(self.seed + 1_000_003, i) for i in range(count)]

    def score(self, completion: str, record: dict[str, Any]) -> float:
        return float(arithmetic.extract_answer(completion) == int(record["answer"]))


class ReasoningGymTask:
    """A reasoning-gym dataset by name, regenerated from (name, seed, index)."""

    name = "reasoning_gym"
    SIZE = 100_000  # items are a function of (seed, index); size only bounds the index

    def __init__(self, dataset: str, seed: int, config: dict[str, Any]):
        import reasoning_gym

        try:
            self.train = reasoning_gym.create_dataset(dataset, seed=seed, size=self.SIZE, **config)
            self.held_out = reasoning_gym.create_dataset(dataset, seed=seed + 1_000_003,
                                                         size=self.SIZE, **config)
        except Exception as exc:  # unknown name or bad config: reasoning-gym raises many kinds
            raise TaskError(f"task.gym_dataset '{dataset}': {exc}") from None
        self.dataset, self.seed, self.config = dataset, seed, config

    def _record(self, data, seed: int, index: int) -> dict[str, Any]:
        entry = data[index % self.SIZE]
        return {"question": entry["question"], "answer": str(entry["answer"]),
                "metadata": entry["metadata"],
                "spec": {"task": "reasoning_gym", "dataset": self.dataset, "seed": seed,
                         "index": index % self.SIZE, "config": self.config}}

    def record(self, index: int) -> dict[str, Any]:
        return self._record(self.train, self.seed, index)

    def eval_records(self, count: int) -> list[dict[str, Any]]:
        return [self._record(self.held_out, self.seed + 1_000_003, i) for i in range(count)]

    def score(self, completion: str, record: dict[str, Any]) -> float:
        entry = {"question": record["question"], "answer": record["answer"],
                 "metadata": record["metadata"]}
        return float(self.train.score_answer(completion, entry))


def gold_answer(text: str) -> str:
    """GSM8K style: the part after `####` when present, else the whole answer."""
    return text.split("####")[-1].strip()


class DatasetTask:
    """A local question/answer dataset (JSONL, Parquet, or `save_to_disk` folder), math-verify scored.

    The last `eval_size` rows are held out; training cycles through the rest in epochs.
    """

    name = "dataset"

    def __init__(self, path: str, question_key: str, answer_key: str, eval_size: int):
        rows = load_rows(path)
        missing = [k for k in (question_key, answer_key) if k not in rows.column_names]
        if missing:
            raise TaskError(f"task.path {path}: missing column(s) {missing} "
                            f"(has {rows.column_names}); set task.question_key/answer_key")
        if len(rows) <= eval_size:
            raise TaskError(f"task.path {path}: {len(rows)} rows, need more than "
                            f"task.eval_size={eval_size}")
        self.rows, self.path = rows, path
        self.question_key, self.answer_key = question_key, answer_key
        self.train_size = len(rows) - eval_size

    def _record(self, row_index: int) -> dict[str, Any]:
        row = self.rows[row_index]
        return {"question": row[self.question_key], "answer": gold_answer(str(row[self.answer_key])),
                "spec": {"task": "dataset", "path": self.path, "row": row_index}}

    def record(self, index: int) -> dict[str, Any]:
        return self._record(index % self.train_size)

    def eval_records(self, count: int) -> list[dict[str, Any]]:
        return [self._record(self.train_size + i) for i in range(min(count, len(self.rows) - self.train_size))]

    def score(self, completion: str, record: dict[str, Any]) -> float:
        return math_verify_score(completion, record["answer"])


def math_verify_score(completion: str, gold: str) -> float:
    """1.0 when math-verify finds the gold answer in the completion (boxed or final number)."""
    from math_verify import parse, verify

    # Timeouts off: math-verify's own use signal.alarm, which only works in the main thread;
    # the reward runner enforces its own timeout instead.
    gold_parsed = parse(gold, parsing_timeout=None)
    answer_parsed = parse(completion, parsing_timeout=None)
    return float(bool(gold_parsed) and verify(gold_parsed, answer_parsed, timeout_seconds=None))


def load_rows(path: str):
    """Open a local dataset as a `datasets.Dataset`, choosing the reader by what the path is."""
    import datasets

    source = Path(path)
    if not source.exists():
        raise TaskError(f"task.path: dataset not found: {path}")
    try:
        if source.is_dir():
            loaded = datasets.load_from_disk(str(source))
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(source.suffix)
        if kind is None:
            raise TaskError(f"task.path {path}: expected .jsonl, .json, .parquet or a dataset folder")
        return datasets.load_dataset(kind, data_files=str(source), split="train")
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"task.path {path}: cannot read dataset ({type(exc).__name__}: {exc})") from None


def build_task(cfg) -> Task:
    """The task a recipe's `task` section names."""
    if cfg.name == "arithmetic":
        return ArithmeticTask(cfg.seed, cfg.digits_min, cfg.digits_max, cfg.operands, cfg.scratchpad)
    if cfg.name == "reasoning_gym":
        return ReasoningGymTask(cfg.gym_dataset, cfg.seed, cfg.gym_config)
    if cfg.name == "dataset":
        return DatasetTask(cfg.path, cfg.question_key, cfg.answer_key, cfg.eval_size)
    raise TaskError(f"task.name '{cfg.name}': unknown task (known: arithmetic, reasoning_gym, dataset)")
