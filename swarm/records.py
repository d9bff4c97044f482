"""What one peer publishes for one group, how it is checked, and the swarm's shared clock.

A record is one group: the task spec and the decoded completions, nothing else. Never rewards,
answers or token ids: a receiver regenerates the task, re-tokenises and re-scores by itself, so
none of them could be trusted anyway. Every record is bad input until `decode_group` accepts it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from rollover.tasks.errors import RolloverError

FORMAT = 1

# Every reason a peer's record can be turned away, counted under these names.
REJECTION_REASONS = (
    "malformed", "oversized", "not_utf8", "bad_signature", "missing_signature", "replayed",
    "wrong_round", "duplicate", "copied", "unknown_task", "index_out_of_range", "too_many_groups",
    "too_many_completions", "completion_too_long", "flooding", "unlikely", "uninformative",
    "pool_full", "new_senders", "newcomer_records", "wrong_steps",
)
MAX_NESTING = 3  # a record is an object holding a spec object and a list of strings: depth 2


class SwarmError(RolloverError, RuntimeError):
    """This node cannot take part (bad key file, cannot join the DHT): one line for the user."""


class Rejected(ValueError):
    """A peer's record turned away; `reason` is one of REJECTION_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REJECTION_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Caps:
    """Hard limits on what one peer may send (the recipe's `swarm` section fills them)."""

    max_record_bytes: int = 12288
    max_completions: int = 16
    max_completion_chars: int = 2048
    max_groups_per_peer: int = 8


def _round_trips_utf8(text: str) -> str:
    text.encode("utf-8")  # a lone surrogate ("\\ud800" is valid JSON) raises UnicodeEncodeError
    return text


# Text that is valid Unicode: digests, tokenizers and logs all encode it without error.
Text = Annotated[StrictStr, AfterValidator(_round_trips_utf8)]
# A spec is a flat mapping of names to scalars: all that regenerating a task needs.
SpecValue = Text | StrictInt | float | bool | None


class SharedGroup(BaseModel):
    """One group as a peer publishes it (pydantic v2; unknown fields are malformed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = Field(FORMAT, ge=FORMAT, le=FORMAT)
    round: StrictInt = Field(ge=0)
    spec: dict[Text, SpecValue] = Field(max_length=32)
    completions: list[Text] = Field(min_length=1)


def encode_group(round_index: int, spec: dict[str, Any], completions: list[str]) -> bytes:
    """The bytes a node stores for one of its groups (compact, key-sorted JSON)."""
    record = SharedGroup(round=round_index, spec=spec, completions=completions)
    text = json.dumps(record.model_dump(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # hivemind strips every "[signature:...]" from a stored value, which breaks our signature and
    # fails the whole publish; outside strings "[" is never followed by a letter, so escaping it
    # as JSON's \u005b changes no decoded value.
    return text.replace("[signature:", "\\u005bsignature:").encode("utf-8")


def decode_group(raw: bytes, caps: Caps) -> SharedGroup:
    """Parse and cap a peer's bytes; raises Rejected with the first reason that applies."""
    if not isinstance(raw, bytes):
        raise Rejected("malformed", f"value is a {type(raw).__name__}, not bytes")
    if len(raw) > caps.max_record_bytes:
        raise Rejected("oversized", f"{len(raw)} bytes > {caps.max_record_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("not_utf8") from None
    if nesting_exceeds(text, MAX_NESTING):
        raise Rejected("malformed", f"JSON nested deeper than {MAX_NESTING}")
    try:
        data = json.loads(text, parse_constant=_no_constant)
        record = SharedGroup.model_validate(data)
    except Exception as exc:  # anything a peer's bytes make the parser raise is their fault
        raise Rejected("malformed", (str(exc).splitlines() or [type(exc).__name__])[0][:120]) from None
    if any(isinstance(v, float) and not math.isfinite(v) for v in record.spec.values()):
        raise Rejected("malformed", "non-finite number in spec")
    if len(record.completions) > caps.max_completions:
        raise Rejected("too_many_completions", f"{len(record.completions)} > {caps.max_completions}")
    longest = max(len(c) for c in record.completions)
    if longest > caps.max_completion_chars:
        raise Rejected("completion_too_long", f"{longest} characters > {caps.max_completion_chars}")
    return record


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# JSON strings (escapes included), matched without backtracking; what is left is the structure.
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_INNERMOST_RE = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")


def nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON `text` nests arrays/objects deeper than `limit`, found without parsing it
    (a nesting bomb makes the parser recurse): strings are blanked, then innermost brackets are
    removed `limit` times; any bracket left was deeper (or unbalanced, malformed anyway)."""
    structure = _JSON_STRING_RE.sub("", text)
    for _ in range(limit):
        structure, removed = _INNERMOST_RE.subn("", structure)
        if not removed:
            break
    return any(bracket in structure for bracket in "[]{}")


def spec_key(spec: dict[str, Any]) -> str:
    """A canonical text form of a spec, for digests and de-duplication."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# Whitespace and characters that render as nothing: editing them does not make a new text.
_INVISIBLE_RE = re.compile(r"[\s\u00ad\u034f\u115f\u1160\u180e\u200b-\u200f\u202a-\u202e"
                           r"\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]+")


def normalised_text(text: str) -> str:
    """A completion's text as compared for copies: NFKC (look-alike forms folded), whitespace and
    invisible characters removed."""
    return _INVISIBLE_RE.sub("", unicodedata.normalize("NFKC", text))


def completion_digest(spec: dict[str, Any], completion: str) -> str:
    """The digest of one completion of one task: the same normalised text for the same canonical
    spec (pass this node's regeneration of it), the same digest."""
    key = f"{spec_key(spec)}\x00{normalised_text(completion)}"
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def group_digest(spec: dict[str, Any], completions: list[str]) -> str:
    """Order-free digest of a group's completions: a reordered copy is still a copy."""
    parts = sorted(completion_digest(spec, c) for c in completions)
    return hashlib.sha256("".join(parts).encode("ascii")).hexdigest()


def round_at(now: float, round_seconds: float) -> int:
    """The swarm's round at wall-clock time `now`: epochs of `round_seconds`, the same on every
    peer whose clock is right, so no node counts rounds by itself."""
    return int(now // round_seconds)


def round_deadline(round_index: int, round_seconds: float) -> float:
    """Wall-clock time at which `round_index` ends."""
    return (round_index + 1) * round_seconds
