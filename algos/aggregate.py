"""How per-token loss terms become one scalar: the one thing that tells the losses apart.

Normalisers can be given for the whole optimiser step, so that a batch split into micro-batches
(gradient accumulation) sums to exactly the loss of the unsplit batch.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Reduction = Literal["seq_mean", "token_mean", "seq_sum_const"]

#: Each loss's reduction of its per-token (or, for gspo, per-sequence) terms.
REDUCTION = {
    "grpo": "seq_mean",  # mean over each sequence's tokens, then over sequences
    "gspo": "seq_mean",
    "gspo_token": "seq_mean",
    "dapo": "token_mean",  # mean over all tokens of the step's batch
    # BNPO normalises by the tokens of the batch one process sees. With micro-batches that is
    # still the whole optimiser step's batch (a per-micro-batch mean would scale the loss with
    # the number of micro-batches); on one process it therefore equals dapo.
    "bnpo": "token_mean",
    "dr_grpo": "seq_sum_const",  # token sum divided by a constant length, mean over sequences
}


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is set (all of it, or along `dim`); 0 where nothing is."""
    weight = mask.to(values.dtype)
    total = (values * weight).sum() if dim is None else (values * weight).sum(dim)
    count = weight.sum() if dim is None else weight.sum(dim)
    return total / count.clamp(min=1)


def aggregate(
    values: Tensor,
    active: Tensor,
    reduction: Reduction,
    *,
    num_sequences: int | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    length: int | None = None,
) -> Tensor:
    """Reduce per-token `values` [batch, seq] over the `active` tokens to a scalar.

    `num_sequences` / `num_tokens`: the step's totals when this is one micro-batch of it
    (default: this batch's row count / active-token count). `length`: the constant divisor of
    `seq_sum_const`. Sequences with no active token count as zero in the sequence means.
    """
    weight = active.to(values.dtype)
    rows = values.shape[0] if num_sequences is None else num_sequences
    if reduction == "seq_mean":
        return masked_mean(values, active, dim=-1).sum() / rows
    total = (values * weight).sum()
    if reduction == "token_mean":
        return total / (weight.sum().clamp(min=1) if num_tokens is None else num_tokens)
    if reduction == "seq_sum_const":
        if length is None:
            raise ValueError("dr_grpo needs a constant length (algo.dr_grpo_length or rollout.max_tokens)")
        return total / (length * rows)
    raise ValueError(f"unknown reduction {reduction!r}")


def sequence_mean(values: Tensor, num_sequences: int | Tensor | None = None) -> Tensor:
    """Mean of per-sequence terms [batch] (sum over `num_sequences` when it is the step's count)."""
    return values.sum() / (values.shape[0] if num_sequences is None else num_sequences)

