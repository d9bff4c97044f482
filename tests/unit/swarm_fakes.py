"""Shared by the swarm unit tests: the arithmetic task they publish and a judge without a model."""

from __future__ import annotations

from rollover.rollout.types import Group, Sample
from rollover.tasks.registry import ArithmeticTask

TASK = ArithmeticTask(seed=0, digits_min=1, digits_max=3, operands=2, scratchpad=True)


class CharJudge:
    """Scores with the task's own verifier, characters as tokens; every text as likely as our own
    samples (-1 nats/token) unless `likelihoods` names its mean log-prob."""

    def __init__(self, likelihoods: dict[str, float] | None = None):
        self.likelihoods = likelihoods or {}

    def build_group(self, record, completions, sender):
        samples = [Sample(prompt_ids=[1], response_ids=[ord(c) for c in text] or [0], finish_reason="stop",
                          text=text, reward=TASK.score(text, record)) for text in completions]
        return Group(uid=-1, task=record, samples=samples, sender=sender)

    def mean_logprobs(self, group):
        return [self.likelihoods.get(s.text, -1.0) for s in group.samples]
