"""A group's rewards, as the scheduler and the swarm's judge both need them.

The one object that scores: the recipe's reward functions on each sample's decoded text, plus
DAPO's overlong term on its token count. Text is decoded once, where the tokens are made (the
rollout's group run for our groups, `LocalJudge.build_group` for a peer's): scoring reads
`Sample.text` and never decodes again.
"""

from __future__ import annotations

import torch

from rollover.algos.filters import is_informative, overlong_penalty
from rollover.rollout.types import Group
from rollover.tasks.rewards import RewardRunner
from rollover.trainer.config import AlgoConfig


class GroupScorer:
    """`scorer(group)` -> one reward per sample (`rewards` runs the recipe's reward functions)."""

    def __init__(self, rewards: RewardRunner, algo: AlgoConfig, max_tokens: int):
        self.rewards, self.algo, self.max_tokens = rewards, algo, max_tokens

    def __call__(self, group: Group) -> list[float]:
        texts = [sample.text for sample in group.samples]
        rewards = self.rewards.score([group.task["question"]] * len(texts), texts, [group.task] * len(texts))
        if self.algo.overlong_buffer:
            lengths = torch.tensor([len(sample.response_ids) for sample in group.samples])
            shaping = overlong_penalty(lengths, self.max_tokens, self.algo.overlong_buffer, self.algo.overlong_penalty)
            rewards = [reward + float(term) for reward, term in zip(rewards, shaping)]
        return rewards


def informative(group: Group) -> bool:
    """Dynamic sampling's filter: keep a group only if its rewards differ (else no gradient)."""
    return is_informative(group.rewards)
