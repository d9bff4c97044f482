"""From scored groups to padded training tensors, packed into micro-batches by a token budget."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from rollover.rollout.types import Group


@dataclass
class Row:
    """One sample as the trainer sees it: token ids, behaviour log-probs, versions, advantage.

    A peer's sample (swarm) has no behaviour log-probs and no versions (None): no behaviour
    policy of ours produced it, so the off-policy correction treats it as on-policy.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float] | None
    versions: list[int] | None
    advantage: float
    truncated: bool
    old_logprobs: Tensor | None = None  # pi_old per response token, set before the first update

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def rows_from_groups(groups: list[Group], advantages: Tensor) -> list[Row]:
    """One row per sample with a response; `advantages` is [num_groups, group_size]."""
    rows = []
    for group, group_adv in zip(groups, advantages.tolist()):
        for sample, adv in zip(group.samples, group_adv):
            if not sample.response_ids:
                continue  # nothing to learn from an empty response (e.g. zero budget)
            external = group.sender is not None
            rows.append(Row(sample.prompt_ids, sample.response_ids,
                            None if external else sample.logprobs, None if external else sample.versions,
                            adv, sample.truncated))
    return rows


def split_minibatches(rows: list[Row], count: int, seed: int) -> list[list[Row]]:
    """`count` shuffled, near-equal mini-batches: one optimizer update each."""
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    count = max(1, min(count, len(shuffled)))
    return [shuffled[i::count] for i in range(count)]


def pack(rows: list[Row], token_budget: int) -> list[list[Row]]:
    """Micro-batches whose padded size (rows x longest row) stays within `token_budget`.

    Rows are sorted by length so that padding is small; a row longer than the budget gets a
    micro-batch of its own.
    """
    ordered = sorted(rows, key=lambda r: r.length, reverse=True)
    batches: list[list[Row]] = []
    for row in ordered:
        current = batches[-1] if batches else None
        if current and (len(current) + 1) * current[0].length <= token_budget:
            current.append(row)
        else:
            batches.append([row])
    return batches


@dataclass
class MicroBatch:
    """Padded tensors; per-token tensors are [rows, seq-1], aligned with next-token log-probs."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    behaviour_logprobs: Tensor
    stale_mask: Tensor
    external_mask: Tensor  # response tokens of peers' samples: no behaviour log-probs
    truncated: Tensor
    advantages: Tensor


def collate(rows: list[Row], pad_id: int, current_version: int, device: torch.device) -> MicroBatch:
    """Right-padded tensors for `rows`; tokens from an older policy version are marked stale."""
    width = max(r.length for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    behaviour = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    stale = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    external = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, row in enumerate(rows):
        start, end = len(row.prompt_ids), row.length
        ids[i, :end] = torch.tensor(row.prompt_ids + row.response_ids)
        attention[i, :end] = 1
        # Position t predicts token t+1: response tokens start..end-1 are predicted at start-1..end-2.
        response[i, start - 1:end - 1] = True
        if row.behaviour_logprobs is None:
            external[i, start - 1:end - 1] = True
            continue
        behaviour[i, start - 1:end - 1] = torch.tensor(row.behaviour_logprobs, dtype=torch.float32)
        stale[i, start - 1:end - 1] = torch.tensor(row.versions) < current_version
    return MicroBatch(
        input_ids=ids.to(device), attention_mask=attention.to(device), response_mask=response.to(device),
        behaviour_logprobs=behaviour.to(device), stale_mask=stale.to(device),
        external_mask=external.to(device),
        truncated=torch.tensor([r.truncated for r in rows], device=device),
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32, device=device),
    )


def scatter_response(values: Tensor, rows: list[Row]) -> list[Tensor]:
    """Per-row response-token slices of a [rows, seq-1] tensor (inverse of `collate`'s layout)."""
    return [values[i, len(r.prompt_ids) - 1:r.length - 1].detach().cpu() for i, r in enumerate(rows)]


def gather_response(per_row: list[Tensor], rows: list[Row], width: int, device: torch.device) -> Tensor:
    """A [rows, width-1] tensor holding each row's response-token values at their positions."""
    out = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (values, row) in enumerate(zip(per_row, rows)):
        out[i, len(row.prompt_ids) - 1:row.length - 1] = values
    return out.to(device)
