"""The trainer's side of judging a peer's group: its own tokenizer, reward and policy.

`swarm/` decides what to trust; this turns accepted text into groups the trainer can use, with
nothing of the sender's kept but the words: token ids come from our tokenizer (capped at our
`max_tokens`), rewards from our verifier, likelihoods from our policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rollover.rollout.types import Group, Sample
from rollover.tasks.prompts import prompt_ids
from rollover.trainer.batch import Row, collate, pack, scatter_response
from rollover.trainer.config import Recipe
from rollover.trainer.policy import Policy

EXTERNAL_UID = -1  # peers' groups are not draws of our prompt stream (the ledger never sees them)


class LocalJudge:
    """Builds and scores peers' groups for `swarm.receive.Inbox.take`."""

    def __init__(self, recipe: Recipe, policy: Policy, score_group: Callable[[Group], list[float]]):
        self.recipe, self.policy, self.score_group = recipe, policy, score_group

    def build_group(self, record: dict[str, Any], completions: list[str], sender: str) -> Group:
        tokenizer, rollout = self.policy.tokenizer, self.recipe.rollout
        prompt = prompt_ids(record, tokenizer, self.recipe.task.prompt_format, self.recipe.task.system_prompt)
        samples = []
        for text in completions:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) < rollout.max_tokens and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)  # it ended: our own samples end the same way
            finish = "length" if len(ids) > rollout.max_tokens else "stop"
            samples.append(Sample(prompt_ids=list(prompt), response_ids=ids[: rollout.max_tokens],
                                  finish_reason=finish))
        group = Group(uid=EXTERNAL_UID, task=record, samples=samples, sender=sender)
        for sample, reward in zip(samples, self.score_group(group)):  # scores our tokens' text
            sample.reward = reward
        return group

    @torch.no_grad()
    def mean_logprobs(self, group: Group) -> list[float]:
        return mean_logprobs(self.policy, group.samples, self.recipe.train.micro_batch_tokens,
                             self.recipe.rollout.temperature)


def mean_logprobs(policy: Policy, samples: list[Sample], token_budget: int, temperature: float) -> list[float]:
    """Per-token mean log-likelihood of each sample's response under `policy`."""
    rows = [Row(s.prompt_ids, s.response_ids, None, None, 0.0, False) for s in samples if s.response_ids]
    means: dict[int, float] = {}
    was_training = policy.model.training
    policy.model.eval()
    try:
        for micro in pack(rows, token_budget):
            batch = collate(micro, policy.tokenizer.pad_token_id, 0, policy.device)
            logprobs, _ = policy.token_logprobs(batch.input_ids, batch.attention_mask, temperature)
            for row, values in zip(micro, scatter_response(logprobs, micro)):
                means[id(row)] = float(values.float().mean())
    finally:
        policy.model.train(was_training)
    return [means[id(r)] for r in rows]
