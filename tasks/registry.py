"""The task registry: each task yields deterministic records and scores completions.

A record is a dict with at least `question`, `answer` and `spec`; `spec` is everything needed
to regenerate the record elsewhere (a resumed run, a swarm peer), and never the reward.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

from rollover.tasks import arithmetic, word_problems
from rollover.tasks.errors import UsageError

log = logging.getLogger(__name__)


class TaskError(UsageError, ValueError):
    """A task that cannot be built from its settings (missing file, unknown name, bad columns)."""


class Task(Protocol):
    name: str
    # True when `score` runs in bounded time (safe to call in-process, no timeout needed);
    # otherwise the correctness reward runs in a reward worker that can be killed.
    bounded_score: bool

    def record(self, index: int) -> dict[str, Any]:
        """Training record `index` (deterministic; datasets cycle through epochs)."""

    def eval_records(self, count: int) -> list[dict[str, Any]]:
        """Held-out records, disjoint from training records."""

    def score(self, completion: str, record: dict[str, Any]) -> float:
        """Correctness in [0, 1] of `completion` against the task's own answer."""


class ArithmeticTask:
    """Built-in multi-operand addition with a scratchpad (see tasks/arithmetic.py)."""

    name = "arithmetic"
    bounded_score = True  # one linear regex and an int() over the completion

    def __init__(self, seed: int, digits_min: int, digits_max: int, operands: int, scratchpad: bool,
                 operands_max: int | None = None):
        self.seed, self.scratchpad = seed, scratchpad
        self.digits_min, self.digits_max, self.operands = digits_min, digits_max, operands
        self.operands_max = operands_max  # None: every problem has `operands` numbers

    def _record(self, seed: int, index: int) -> dict[str, Any]:
        return arithmetic.arithmetic_record(seed, index, self.digits_min, self.digits_max,
                                            self.operands, self.scratchpad, self.operands_max)

    def record(self, index: int) -> dict[str, Any]:
        return self._record(self.seed, index)

    def eval_records(self, count: int) -> list[dict[str, Any]]:
        # A separate stream; a 1-digit problem may coincide with a training one, as in any
        # finite problem space, but the streams are independent draws.
        return [self._record(self.seed + 1_000_003, i) for i in range(count)]

    def score(self, completion: str, record: dict[str, Any]) -> float:
        return float(arithmetic.extract_answer(completion) == int(record["answer"]))

    def check_steps(self, completion: str, record: dict[str, Any]) -> bool:
        """Whether a completion's worked steps are right (always True without a scratchpad).

        Used on peers' completions: a peer could otherwise pair a wrong scratchpad with the right
        answer and have us reward the wrong working. Tasks without this method check final
        answers only.
        """
        if not self.scratchpad:
            return True
        return arithmetic.steps_are_right(completion, arithmetic.question_numbers(record["question"]))


class ReasoningGymTask:
    """A reasoning-gym dataset by name, regenerated from (name, seed, index)."""

    name = "reasoning_gym"
    bounded_score = False  # each gym dataset scores with its own code
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
        # A spec holds scalars only (it crosses the swarm): the config is named by its digest.
        self.config_digest = content_digest([json.dumps(config, sort_keys=True, default=str)])

    def _record(self, data, seed: int, index: int) -> dict[str, Any]:
        entry = data[index % self.SIZE]
        return {"question": entry["question"], "answer": str(entry["answer"]),
                "metadata": entry["metadata"],
                "spec": {"task": "reasoning_gym", "dataset": self.dataset, "seed": seed,
                         "index": index % self.SIZE, "config": self.config_digest}}

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


class AnswerVerifier:
    """math-verify against a record's gold answer: all a `DatasetTask` needs to score.

    Reward workers get this (a few bytes to pickle), never the dataset's rows.
    """

    def score(self, completion: str, record: dict[str, Any]) -> float:
        return math_verify_score(completion, record["answer"])


class DatasetTask:
    """A local question/answer dataset (JSONL, JSON, Parquet, or `save_to_disk` folder), math-verify scored.

    Rows without a question or answer are dropped and counted (`dropped_rows`, one warning line);
    numbers are taken as text; any other value, and any unreadable line, is a `TaskError` naming
    the row. The last `eval_size` kept rows are held out; training cycles through the rest.
    """

    name = "dataset"
    bounded_score = False  # math-verify's sympy can take unbounded time on adversarial expressions

    def __init__(self, path: str, question_key: str, answer_key: str, eval_size: int):
        where, columns, found = read_rows(data_path(path), (question_key, answer_key))
        missing = [k for k in (question_key, answer_key) if k not in found]
        if missing:
            raise TaskError(f"task.path {path}: missing column(s) {missing} "
                            f"(has {sorted(found)}); set task.question_key/answer_key")
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.row_numbers: list[int] = []  # each kept row's index among the file's rows
        for index, (label, question, answer) in enumerate(zip(where, *columns)):
            question = _as_text(path, label, question_key, question)
            answer = gold_answer(_as_text(path, label, answer_key, answer))
            if question.strip() and answer:
                self.questions.append(question)
                self.answers.append(answer)
                self.row_numbers.append(index)
        self.dropped_rows = len(where) - len(self.answers)
        if not self.answers:
            raise TaskError(f"task.path {path}: none of its {len(where)} rows has both a "
                            f"'{question_key}' and an '{answer_key}'")
        if self.dropped_rows:
            log.warning("task.path %s: dropped %d of %d rows without a question or answer",
                        path, self.dropped_rows, len(where))
        if len(self.answers) <= eval_size:
            raise TaskError(f"task.path {path}: {len(self.answers)} usable rows, need more than "
                            f"task.eval_size={eval_size}")
        self.path = path
        # Specs name the dataset by its kept rows' content, not by this machine's path: peers
        # holding the same data elsewhere (or in another format) regenerate the same records.
        self.content = content_digest(json.dumps([r, q, a]) for r, q, a in
                                      zip(self.row_numbers, self.questions, self.answers))
        self.verifier = AnswerVerifier()
        self.train_size = len(self.answers) - eval_size
        # file row number -> kept index, for training rows only (peers' specs name file rows)
        self.train_rows = {row: i for i, row in enumerate(self.row_numbers[: self.train_size])}

    def _record(self, kept_index: int) -> dict[str, Any]:
        return {"question": self.questions[kept_index], "answer": self.answers[kept_index],
                "spec": {"task": "dataset", "dataset": self.content, "row": self.row_numbers[kept_index]}}

    def record(self, index: int) -> dict[str, Any]:
        return self._record(index % self.train_size)

    def eval_records(self, count: int) -> list[dict[str, Any]]:
        held_out = len(self.answers) - self.train_size
        return [self._record(self.train_size + i) for i in range(min(count, held_out))]

    def score(self, completion: str, record: dict[str, Any]) -> float:
        return self.verifier.score(completion, record)


def content_digest(parts) -> str:
    """A short sha256 over text parts (one per line): names content the same on every machine."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()[:32]


def math_verify_score(completion: str, gold: str) -> float:
    """1.0 when math-verify finds the gold answer in the completion (boxed or final number)."""
    from math_verify import parse, verify

    # Timeouts off: math-verify's own use signal.alarm, which only works in the main thread;
    # the reward runner enforces its own timeout instead.
    gold_parsed = parse(gold, parsing_timeout=None)
    answer_parsed = parse(completion, parsing_timeout=None)
    return float(bool(gold_parsed) and verify(gold_parsed, answer_parsed, timeout_seconds=None))


def _as_text(path: str, label: str, key: str, value: Any) -> str:
    """A question or answer as text: numbers are converted, missing values are empty."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):  # NaN: missing
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TaskError(f"task.path {path}: {label}: '{key}' is a {type(value).__name__} "
                    f"({str(value)[:40]}), expected text or a number")


# Datasets shipped in the package, named like builtin models so recipes work from any folder.
BUILTIN_DATA = {"builtin:word-problems": word_problems.DATA_DIR / word_problems.TRAIN_FILE}


def data_path(path: str) -> str:
    """The file a `task.path` names: a shipped dataset's file for `builtin:` names, else `path`."""
    if path.startswith("builtin:"):
        if path not in BUILTIN_DATA:
            raise TaskError(f"task.path: unknown built-in dataset '{path}' (known: {', '.join(BUILTIN_DATA)})")
        return str(BUILTIN_DATA[path])
    return path


def read_rows(path: str, keys: tuple[str, ...]) -> tuple[list[str], list[list[Any]], set[str]]:
    """A local dataset's rows: (a label per row for messages, the `keys` columns, all column names).

    JSON files are parsed here, line by line, so a bad line is reported with its number and
    values keep their JSON types; Parquet files and dataset folders are read with `datasets`.
    """
    source = Path(path)
    if not source.exists():
        raise TaskError(f"task.path: dataset not found: {path}")
    if source.suffix in (".jsonl", ".json") and not source.is_dir():
        rows = _json_rows(path, source)
        found = {key for _, row in rows for key in row}
        return [label for label, _ in rows], [[row.get(k) for _, row in rows] for k in keys], found
    table = load_rows(path)
    if len(table) == 0:
        raise TaskError(f"task.path {path}: the dataset has no rows")
    found = set(table.column_names)
    return ([f"row {i}" for i in range(len(table))],
            [table[k] if k in found else [None] * len(table) for k in keys], found)


def _json_rows(path: str, source: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, object) per row of a JSON Lines file, or of a JSON file holding a list of objects."""
    data = source.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
    if source.suffix == ".json":
        try:
            whole = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None  # perhaps JSON Lines under a .json name: the per-line scan says
        if whole is not None and not isinstance(whole, list):
            raise TaskError(f"task.path {path}: expected a JSON list of objects or one object per line")
        if whole is not None:
            for i, item in enumerate(whole):
                if not isinstance(item, dict):
                    raise TaskError(f"task.path {path}: item {i} is not a JSON object")
            if not whole:
                raise TaskError(f"task.path {path}: the file has no rows")
            return [(f"item {i}", item) for i, item in enumerate(whole)]
    rows = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
            row = json.loads(line) if line.strip() else None
        except UnicodeDecodeError:
            raise TaskError(f"task.path {path}: line {number} is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise TaskError(f"task.path {path}: line {number} is not valid JSON "
                            f"({exc.msg}, column {exc.colno})") from None
        if row is None:
            continue
        if not isinstance(row, dict):
            raise TaskError(f"task.path {path}: line {number} is not a JSON object")
        rows.append((f"line {number}", row))
    if not rows:
        raise TaskError(f"task.path {path}: the file has no rows")
    return rows


def load_rows(path: str):
    """Open a local Parquet file or dataset folder as a `datasets.Dataset`."""
    import datasets

    source = Path(path)
    try:
        if source.is_dir():
            loaded = datasets.load_from_disk(str(source))
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        if source.suffix != ".parquet":
            raise TaskError(f"task.path {path}: expected .jsonl, .json, .parquet or a dataset folder")
        return datasets.load_dataset("parquet", data_files=str(source), split="train")
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"task.path {path}: cannot read dataset ({type(exc).__name__}: {exc})") from None


class SpecError(ValueError):
    """A spec this node cannot regenerate; `reason` is `unknown_task` or `index_out_of_range`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def record_from_spec(task: Task, spec: dict[str, Any]) -> dict[str, Any]:
    """Regenerate a training record from a peer's spec with this node's own task.

    Only records this node could itself draw for training are accepted: same task and settings
    (seed, digits, dataset...), index in the training range. A held-out record's spec carries
    the held-out seed or row, so a peer cannot make us train on our evaluation set.
    """
    if spec.get("task") != task.name:
        raise SpecError("unknown_task", f"task {str(spec.get('task'))[:40]!r}, this node runs {task.name!r}")
    key = "row" if task.name == "dataset" else "index"
    index = spec.get(key)
    if not isinstance(index, int) or isinstance(index, bool):
        raise SpecError("unknown_task", f"spec has no integer {key!r}")
    if task.name == "dataset":
        if index not in task.train_rows:
            raise SpecError("index_out_of_range", f"row {index} is not a training row here")
        index = task.train_rows[index]
    elif not 0 <= index < getattr(task, "SIZE", 2**62):
        raise SpecError("index_out_of_range", f"index {index}")
    record = task.record(index)
    # Compared as canonical JSON, not with ==: `true` or `1.0` for 1 are equal in Python but
    # would be another spec (and another digest) elsewhere.
    if _canonical(record["spec"]) != _canonical(spec):
        raise SpecError("unknown_task", "spec differs from this node's task settings")
    return record


def _canonical(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def build_task(cfg) -> Task:
    """The task a recipe's `task` section names."""
    if cfg.name == "arithmetic":
        return ArithmeticTask(cfg.seed, cfg.digits_min, cfg.digits_max, cfg.operands, cfg.scratchpad,
                              cfg.operands_max)
    if cfg.name == "reasoning_gym":
        return ReasoningGymTask(cfg.gym_dataset, cfg.seed, cfg.gym_config)
    if cfg.name == "dataset":
        return DatasetTask(cfg.path, cfg.question_key, cfg.answer_key, cfg.eval_size)
    raise TaskError(f"task.name '{cfg.name}': unknown task (known: arithmetic, reasoning_gym, dataset)")
