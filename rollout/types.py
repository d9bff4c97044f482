"""The data contract between rollout, algorithms and trainer (docs/ARCHITECTURE.md, "Data contract").

Token ids are the truth: a resumed sample continues from `response_ids`, never from text.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

# `repetition`: vLLM stopped a repetitive pattern; the sample is finished like `stop`.
FinishReason = Literal["stop", "length", "repetition", "aborted"]
FINISHED = ("stop", "length", "repetition")


@dataclass
class Sample:
    """One completion of one prompt, possibly still unfinished (`finish_reason == "aborted"`)."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # behaviour log-prob per response token
    versions: list[int] = field(default_factory=list)  # policy version per response token
    finish_reason: FinishReason | None = None  # None: never started
    reward: float | None = None  # set once finished and scored
    text: str = ""  # decoded response, for verifiers and logs only

    @property
    def finished(self) -> bool:
        return self.finish_reason in FINISHED

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def remaining_budget(self, max_tokens: int) -> int:
        """Tokens this sample may still generate, clamped at zero."""
        return max(0, max_tokens - len(self.response_ids))


@dataclass
class Group:
    """The G samples of one prompt: the unit of scheduling, filtering, buffering and advantages."""

    uid: int  # the prompt's draw index: unique over a run, the key of the conservation ledger
    task: dict[str, Any]  # the task record (question, answer, metadata) the samples answer
    samples: list[Sample]
    sender: str | None = None  # swarm: the peer whose completions these are; None: our own


    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    @property
    def scored(self) -> bool:
        return all(s.reward is not None for s in self.samples)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    def oldest_version(self) -> int | None:
        """The lowest policy version among the group's tokens (None if no tokens yet)."""
        versions = [v for s in self.samples for v in s.versions]
        return min(versions) if versions else None

    def clone(self) -> "Group":
        """An independent copy (token lists copied; much faster than a state round trip)."""
        samples = [
            replace(s, prompt_ids=list(s.prompt_ids), response_ids=list(s.response_ids),
                    logprobs=list(s.logprobs), versions=list(s.versions))
            for s in self.samples
        ]
        return Group(uid=self.uid, task=copy.deepcopy(self.task), samples=samples, sender=self.sender)

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Group":
        return cls(
            uid=state["uid"],
            task=state["task"],
            samples=[Sample(**s) for s in state["samples"]],
            sender=state.get("sender"),
        )
