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


class Ranks:
    """How a step's rows spread over data-parallel ranks; this base is one process with them all.

    Every rank is handed the whole step's rows and trains on its `share` of each mini-batch;
    the loss normalisers are `total`s over ranks, so that with gradients *summed* over ranks N
    ranks compute the update one process computes on the whole batch. Ranks must run the same
    number of forward/backward passes (FSDP's collectives), hence `most`, and must refuse a
    mini-batch together, hence `all_finite`. The gradient-norm clip needs nothing: on FSDP's
    DTensor gradients torch reduces the norm over ranks. trainer/distributed/ranks.py implements
    these over a process group.
    """

    def share(self, rows: list[Row]) -> list[Row]:
        """The rows of `rows` this rank trains on."""
        return rows

    def total(self, count: int) -> int:
        """The sum of `count` over ranks."""
        return count

    def most(self, count: int) -> int:
        """The largest `count` of any rank."""
        return count

    def all_finite(self, finite: bool) -> bool:
        """True when every rank's value is finite."""
        return finite

    def gather_stats(self, collected: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
        """Every rank's micro-batch stats, merged (the step's stats are reduced from all of them)."""
        return collected


ONE_PROCESS = Ranks()


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


def aligned_packs(rows: list[Row], token_budget: int, ranks: Ranks, filler: Row | None) -> list[tuple[list[Row], bool]]:
    """`pack(rows)` as (rows, real) pairs, padded with (`[filler]`, False) passes up to the most
    any rank has: every rank then runs as many forward/backward passes (one process: no padding)."""
    packs = [(micro, True) for micro in pack(rows, token_budget)]
    missing = ranks.most(len(packs)) - len(packs)
    if missing and filler is None:
        raise ValueError("a rank with fewer micro-batches than another needs a filler row")
    return packs + [([filler], False)] * missing


@torch.no_grad()
def response_logprobs(policy: Policy, rows: list[Row], token_budget: int, temperature: float,
                      ranks: Ranks = ONE_PROCESS, filler: Row | None = None) -> list[Tensor]:
    """Each row's response-token log-probs under `policy` as it is (dropout off, no gradient),
    in row order: pi_old before several updates, and the likelihood test of peers' groups.
    With several `ranks`, each passes its own `rows` and a `filler` row all ranks share."""
    found: dict[int, Tensor] = {}
    was_training = policy.model.training
    policy.model.eval()
    try:
        with torch.no_grad():
            for micro, real in aligned_packs(rows, token_budget, ranks, filler):
                batch = collate(micro, policy.tokenizer.pad_token_id, 0, policy.device)
                logprobs, _ = policy.token_logprobs(batch.input_ids, batch.attention_mask, temperature)
                for row, values in zip(micro, scatter_response(logprobs, micro)) if real else ():
                    found[id(row)] = values
    finally:
        policy.model.train(was_training)
    return [found[id(row)] for row in rows]


def set_old_logprobs(policy: Policy, rows: list[Row], token_budget: int, temperature: float,
                     ranks: Ranks = ONE_PROCESS, filler: Row | None = None) -> None:
    """pi_old for every row, before the first update (needed when there are several updates)."""
    for row, values in zip(rows, response_logprobs(policy, rows, token_budget, temperature, ranks, filler)):
        row.old_logprobs = values


def train_on_batch(policy: Policy, optimizer: torch.optim.Optimizer, scheduler, rows: list[Row],
                   algo: AlgoConfig, train: TrainConfig, *, version: int, max_tokens: int,
                   temperature: float, seed: int, ranks: Ranks = ONE_PROCESS) -> dict[str, float | str]:
    """`train.updates_per_batch` optimizer updates over shuffled mini-batches of `rows`.

    With one update, pi_old is the current policy (ratios are exactly 1 and clipping is idle);
    with several, pi_old is fixed before the first, so later mini-batches see clipped ratios.
    A mini-batch whose loss or gradient is not finite is not applied, and neither are the ones
    after it. The returned stats say how many updates were applied (`updates`) and whether one
    was refused (`nonfinite`, and the reason as the string `nonfinite_reason`, to pop before
    logging): when `updates` > 0 the weights changed and the engine must get them. Raises
    NonFiniteLoss only when no update was applied at all.

    `ranks`: data-parallel training (see `Ranks`): every rank passes the same `rows` and `seed`,
    trains on its share of each mini-batch, and applies the same update.
    """
    options = loss_options(algo, max_tokens)
    several = train.updates_per_batch > 1
    minibatches = split_minibatches(rows, train.updates_per_batch, seed)
    shares = [ranks.share(minibatch) for minibatch in minibatches]
    if several:
        owned = {id(row) for share in shares for row in share}
        set_old_logprobs(policy, [row for row in rows if id(row) in owned], train.micro_batch_tokens,
                         temperature, ranks, rows[0] if rows else None)
    collected: dict[str, list[tuple[float, float]]] = defaultdict(list)
    grad_norms: list[float] = []
    learning_rates: list[float] = []
    refused: str | None = None
    pad_id = policy.tokenizer.pad_token_id
    for minibatch, share in zip(minibatches, shares):
        policy.model.train()
        packed = aligned_packs(share, train.micro_batch_tokens, ranks, minibatch[0] if minibatch else None)
        micro_batches = [collate(m, pad_id, version, policy.device) for m, _ in packed]
        masks = [_loss_mask(b, algo) for b in micro_batches]
        num_tokens = ranks.total(sum(int(active_mask(m, b.stale_mask, algo.offpolicy).sum())
                                     for (_, real), m, b in zip(packed, masks, micro_batches) if real))
        num_sequences = ranks.total(len(share))
        update_stats: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (micro_rows, real), batch, mask in zip(packed, micro_batches, masks):
            logprobs, entropy = policy.token_logprobs(batch.input_ids, batch.attention_mask, temperature)
            if not real:  # a pass that keeps this rank in step with the others; adds no gradient
                filler_loss = logprobs.sum() * 0.0
                if not ranks.all_finite(bool(torch.isfinite(filler_loss))):
                    refused = "loss is not finite on another rank"
                    break
                filler_loss.backward()
                continue
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
                entropy=entropy.detach(), num_sequences=num_sequences, num_tokens=max(num_tokens, 1),
                **options)
            if not ranks.all_finite(bool(torch.isfinite(loss))):
                refused = f"loss is {loss.item()}" if not torch.isfinite(loss) else "loss is not finite on another rank"
                break
            loss.backward()
            _merge(update_stats, stats, float(stats["tokens/active"]) or 1.0)
        if refused is None:
            # With FSDP's DTensor gradients, torch reduces the norm over every rank's shards.
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
    out = _reduce(ranks.gather_stats(collected))
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
