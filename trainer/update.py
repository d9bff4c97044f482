"""One training step on a batch: PPO-style mini-batch updates with gradient accumulation."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from rollover.algos.filters import drop_truncated
from rollover.algos.losses import active_mask, loss_options, policy_loss
from rollover.trainer.batch import Row, collate, gather_response, pack, scatter_response, split_minibatches
from rollover.trainer.config import AlgoConfig, TrainConfig
from rollover.trainer.policy import Policy

SUMMED = ("loss", "pg_loss", "kl_loss", "pg_loss/pos_adv", "pg_loss/neg_adv", "tokens/active", "tokens/stale")


class NonFiniteLoss(RuntimeError):
    """Every update of a batch was refused (NaN or infinite loss or gradient): nothing changed."""


def _merge(into: dict[str, list[tuple[float, float]]], stats: dict[str, torch.Tensor], weight: float) -> None:
    for name, value in stats.items():
        into[name].append((float(value), weight))


def _reduce(collected: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Micro-batch stats to step stats: sums for the loss parts, extremes, else weighted means."""
    out = {}
    for name, pairs in collected.items():
        values = [v for v, _ in pairs]
        if name in SUMMED:
            out[name] = sum(values)
        elif name.endswith("/min"):
            out[name] = min(values)
        elif name.endswith("/max"):
            out[name] = max(values)
        else:
            total = sum(w for _, w in pairs)
            out[name] = sum(v * w for v, w in pairs) / total if total else sum(values) / len(values)
    return out


@torch.no_grad()
def response_logprobs(policy: Policy, rows: list[Row], token_budget: int, temperature: float) -> list[Tensor]:
    """Each row's response-token log-probs under `policy` as it is (dropout off, no gradient),
    in row order: pi_old before several updates, and the likelihood test of peers' groups."""
    found: dict[int, Tensor] = {}
    was_training = policy.model.training
    policy.model.eval()
    try:
        with torch.no_grad():
            for micro in pack(rows, token_budget):
                batch = collate(micro, policy.tokenizer.pad_token_id, 0, policy.device)
                logprobs, _ = policy.token_logprobs(batch.input_ids, batch.attention_mask, temperature)
                for row, values in zip(micro, scatter_response(logprobs, micro)):
                    found[id(row)] = values
    finally:
        policy.model.train(was_training)
    return [found[id(row)] for row in rows]


def set_old_logprobs(policy: Policy, rows: list[Row], token_budget: int, temperature: float) -> None:
    """pi_old for every row, before the first update (needed when there are several updates)."""
    for row, values in zip(rows, response_logprobs(policy, rows, token_budget, temperature)):
        row.old_logprobs = values


def train_on_batch(policy: Policy, optimizer: torch.optim.Optimizer, scheduler, rows: list[Row],
                   algo: AlgoConfig, train: TrainConfig, *, version: int, max_tokens: int,
                   temperature: float, seed: int) -> dict[str, float | str]:
    """`train.updates_per_batch` optimizer updates over shuffled mini-batches of `rows`.

    With one update, pi_old is the current policy (ratios are exactly 1 and clipping is idle);
    with several, pi_old is fixed before the first, so later mini-batches see clipped ratios.
    A mini-batch whose loss or gradient is not finite is not applied, and neither are the ones
    after it. The returned stats say how many updates were applied (`updates`) and whether one
    was refused (`nonfinite`, and the reason as the string `nonfinite_reason`, to pop before
    logging): when `updates` > 0 the weights changed and the engine must get them. Raises
    NonFiniteLoss only when no update was applied at all.
    """
    options = loss_options(algo, max_tokens)
    several = train.updates_per_batch > 1
    if several:
        set_old_logprobs(policy, rows, train.micro_batch_tokens, temperature)
    collected: dict[str, list[tuple[float, float]]] = defaultdict(list)
    grad_norms: list[float] = []
    learning_rates: list[float] = []
    refused: str | None = None
    pad_id = policy.tokenizer.pad_token_id
    for minibatch in split_minibatches(rows, train.updates_per_batch, seed):
        policy.model.train()
        packed_rows = pack(minibatch, train.micro_batch_tokens)
        micro_batches = [collate(m, pad_id, version, policy.device) for m in packed_rows]
        masks = [_loss_mask(b, algo) for b in micro_batches]
        num_tokens = sum(int(active_mask(m, b.stale_mask, algo.offpolicy).sum()) for m, b in zip(masks, micro_batches))
        update_stats: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for micro_rows, batch, mask in zip(packed_rows, micro_batches, masks):
            logprobs, entropy = policy.token_logprobs(batch.input_ids, batch.attention_mask, temperature)
            if several:
                old = gather_response([r.old_logprobs for r in micro_rows], micro_rows,
                                      batch.input_ids.shape[1], policy.device)
            else:
                old = logprobs.detach()
            ref = (policy.reference_logprobs(batch.input_ids, batch.attention_mask, temperature)
                   if algo.kl_coef > 0 else None)
            # A peer's tokens have no behaviour policy: their behaviour is pi_old (weight 1).
            behaviour = torch.where(batch.external_mask, old, batch.behaviour_logprobs)
            loss, stats = policy_loss(
                logprobs, old, behaviour, batch.advantages, mask, batch.stale_mask, ref,
                entropy=entropy.detach(), num_sequences=len(minibatch), num_tokens=max(num_tokens, 1),
                **options)
            if not torch.isfinite(loss):
                refused = f"loss is {loss.item()}"
                break
            loss.backward()
            _merge(update_stats, stats, float(stats["tokens/active"]) or 1.0)
        if refused is None:
            norm = float(torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), train.grad_clip))
            if not math.isfinite(norm):
                refused = f"gradient norm is {norm}"
        if refused is not None:  # nothing of this mini-batch is applied, nor of the later ones
            optimizer.zero_grad(set_to_none=True)
            break
        learning_rates.append(optimizer.param_groups[0]["lr"])  # the rate this update uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        grad_norms.append(norm)
        for name, pairs in update_stats.items():
            collected[name].extend(pairs)
    if not grad_norms:
        raise NonFiniteLoss(f"{refused}; no update applied")
    out = _reduce(collected)
    for name in SUMMED[:5]:  # loss parts: the mean over updates of each update's value
        out[name] = out.get(name, 0.0) / len(grad_norms)
    out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    out["learning_rate"] = sum(learning_rates) / len(learning_rates)
    out["updates"] = float(len(grad_norms))
    out["nonfinite"] = float(refused is not None)
    if refused is not None:
        out["nonfinite_reason"] = refused
    return out


def _loss_mask(batch, algo: AlgoConfig) -> torch.Tensor:
    """Response tokens, less truncated samples' when `algo.mask_truncated` is on."""
    return drop_truncated(batch.response_mask, batch.truncated) if algo.mask_truncated else batch.response_mask
