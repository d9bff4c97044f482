"""The likelihood filter: is a peer's text what our policy would write? (issue 25)

The reference is our own recent samples scored by the trainer's judge exactly as peers' text is
(same policy, same temperature, same re-tokenisation path), never the sampler's behaviour
log-probs (other numerics, top-p/top-k renormalisation, an older policy version). A group is
judged as a group: its median completion, and each completion it would reinforce; an odd wrong
completion, which honest sampling makes, never refuses it. Calibrated by
bench/swarm/likelihood_filter.py (results in bench/results/likelihood_filter.json).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from rollover.rollout.types import Group

log = logging.getLogger(__name__)
MIN_REFERENCE = 32  # own samples scored before any verdict (two steps of REFERENCE_PER_STEP)
REFERENCE_PER_STEP = 16  # own samples the judge scores per step (one forward pass of 16)
REFERENCE_KEPT = 512  # the most recent own samples the reference holds
LIKELIHOOD_FLOOR = 0.3  # nats/token: the least deviation scale (a sharpened policy's MAD is ~0.03)


class Scorer(Protocol):
    def mean_logprobs(self, group: Group) -> list[float]:
        """Per-token mean log-likelihood of each sample under this node's current policy."""


class LikelihoodFilter:
    """Our own samples' scores, and the verdict on a peer's group against them."""

    def __init__(self, z: float, z_each: float | None = None, floor: float = LIKELIHOOD_FLOOR,
                 min_reference: int = MIN_REFERENCE):
        self.z = z
        # Each completion the group would reinforce may lie this far out (default: 1.5 x the
        # group's bound, as swarm.likelihood_z_each = 6 is to swarm.likelihood_z = 4).
        self.z_each = 1.5 * z if z_each is None else z_each
        self.floor, self.min_reference = floor, min_reference
        self.reference: deque[float] = deque(maxlen=REFERENCE_KEPT)
        self._pending: list[Group] = []  # own samples waiting for the judge

    def note(self, values: Iterable[float]) -> None:
        """Own samples' mean log-probs as the judge scores them."""
        self.reference.extend(values)

    def note_own_groups(self, groups: list[Group]) -> None:
        """This step's own groups: up to REFERENCE_PER_STEP of their samples, spread over the
        groups, wait for `score_pending` (the judge runs where peers' groups are judged)."""
        chosen: dict[int, list] = {}  # position in `groups` -> its samples picked
        depth, left = 0, REFERENCE_PER_STEP
        while left > 0 and any(depth < len(g.samples) for g in groups):
            for i, group in enumerate(groups):
                if left > 0 and depth < len(group.samples) and group.samples[depth].response_ids:
                    chosen.setdefault(i, []).append(group.samples[depth])
                    left -= 1
            depth += 1
        self._pending = [Group(uid=groups[i].uid, task=groups[i].task, samples=s) for i, s in chosen.items()]

    def score_pending(self, judge: Scorer) -> None:
        """Score the own samples `note_own_groups` kept, with the judge that scores peers."""
        pending, self._pending = self._pending, []
        for group in pending:
            try:
                self.note(judge.mean_logprobs(group))
            except Exception as exc:  # our own text: a failure costs a reference point, nothing more
                log.warning("swarm: scoring our own samples for the likelihood reference failed: %s", exc)

    def is_unlikely(self, values: list[float], rewards: list[float] | None = None) -> bool:
        """True when the group's text is not what our policy would write.

        Robust z-scores against the reference (median; MAD x 1.4826, floored at `floor`
        nats/token: a sharpened policy's own samples spread by a few hundredths, and every other
        honest policy would then look foreign). Refused when the group's median completion lies
        more than `z` below, or any completion the group would reinforce (reward above the
        group's mean; every completion without rewards) more than `z_each` below. No verdict
        before `min_reference` own samples.
        """
        if len(self.reference) < self.min_reference or not values:
            return False  # no picture of our own samples yet
        median = statistics.median(self.reference)
        mad = statistics.median(abs(v - median) for v in self.reference)
        scale = max(1.4826 * mad, self.floor)
        z = [(v - median) / scale for v in values]
        if statistics.median(z) < -self.z:
            return True
        if rewards is None or len(rewards) != len(z):
            reinforced = z
        else:
            mean = sum(rewards) / len(rewards)
            reinforced = [zi for zi, r in zip(z, rewards) if r > mean]
        return any(zi < -self.z_each for zi in reinforced)
