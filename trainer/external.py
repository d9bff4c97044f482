"""The trainer's side of judging a peer's group: its own tokenizer, reward and policy.

`swarm/` decides what to trust; this turns accepted text into groups the trainer can use, with
nothing of the sender's kept but the words: token ids come from our tokenizer (capped at our
`max_tokens`), rewards from our verifier, likelihoods from our policy.

Peer text is tokenised as plain text: a literal "</s>" or "<|im_end|>" in it stays characters,
never our special token (a peer must not choose where we teach the model to stop), so decoding
the trained ids for scoring gives back the text itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rollover.rollout.types import Group, Sample
from rollover.tasks.prompts import prompt_ids
from rollover.trainer.batch import Row
from rollover.trainer.config import Recipe
from rollover.trainer.policy import Policy
from rollover.trainer.update import response_logprobs

EXTERNAL_UID = -1  # peers' groups are not draws of our prompt stream (the ledger never sees them)


class LocalJudge:
    """Builds and scores peers' groups for `swarm.inbox.Inbox.take`."""

    def __init__(self, recipe: Recipe, policy: Policy, score_group: Callable[[Group], list[float]]):
        self.recipe, self.policy, self.score_group = recipe, policy, score_group

    def build_group(self, record: dict[str, Any], completions: list[str], sender: str) -> Group:
        tokenizer, rollout = self.policy.tokenizer, self.recipe.rollout
        prompt = prompt_ids(record, tokenizer, self.recipe.task.prompt_format, self.recipe.task.system_prompt)
        samples = []
        for text in completions:
            ids = plain_text_ids(tokenizer, text)
            # It ended within our budget only if our end-of-sequence token still fits after it,
            # as our own samples end; text that fills the budget was cut off there.
            ended = len(ids) < rollout.max_tokens
            if ended and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            ids = ids[: rollout.max_tokens]
            # Scored as the text of our tokens (decoded here once, as the rollout decodes ours).
            samples.append(Sample(prompt_ids=list(prompt), response_ids=ids,
                                  text=tokenizer.decode(ids, skip_special_tokens=True),
                                  finish_reason="stop" if ended else "length"))
        group = Group(uid=EXTERNAL_UID, task=record, samples=samples, sender=sender)
        for sample, reward in zip(samples, self.score_group(group)):
            sample.reward = reward
        return group

    def mean_logprobs(self, group: Group) -> list[float]:
        return mean_logprobs(self.policy, group.samples, self.recipe.train.micro_batch_tokens,
                             self.recipe.rollout.temperature)


def plain_text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with special-token markup left as text (`split_special_tokens`).

    Raises ValueError if a special id comes out anyway (a tokenizer that ignores the option):
    the group is then refused rather than trained with a peer-chosen special token.
    """
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # unknown text is still text
    if special.intersection(ids):
        raise ValueError("peer text tokenised to a special token")
    return ids


def mean_logprobs(policy: Policy, samples: list[Sample], token_budget: int, temperature: float) -> list[float]:
    """Per-token mean log-likelihood of each sample's response under `policy`."""
    rows = [Row(s.prompt_ids, s.response_ids, None, None, 0.0, False) for s in samples if s.response_ids]
    return [float(values.float().mean()) for values in response_logprobs(policy, rows, token_budget, temperature)]
