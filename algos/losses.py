"""Policy-gradient losses: GRPO, DAPO, Dr. GRPO, BNPO, GSPO and GSPO-token, as one function.

All share the clipped surrogate min(w A, clip(w, 1 - clip_low, 1 + clip_high) A) with
w = pi_theta / pi_old, an optional dual clip (the objective of a negative-advantage token never
falls below clip_c * A), an optional k3 KL penalty to a reference policy, and an off-policy
treatment for tokens the trainer's pi_old did not sample itself:

- old_logprobs: the trainer's log-probs before this batch's first update (pi_old).
- behaviour_logprobs: what the engine reported when sampling: an older policy version for
  tokens resumed from a partial rollout, and engine/trainer numeric mismatch for all tokens.
- offpolicy="tis": every token's term is multiplied by the detached truncated importance weight
  min(exp(old - behaviour), tis_cap); "mask": tokens flagged in `stale_mask` get no gradient;
  "none": behaviour log-probs are ignored.

The losses differ in how per-token terms become a scalar (see `aggregate.REDUCTION`), and GSPO
in using one ratio per sequence, exp(mean log w), clipped per sequence.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from rollover.algos.aggregate import REDUCTION, aggregate, masked_mean, sequence_mean

LossName = Literal["grpo", "dapo", "dr_grpo", "bnpo", "gspo", "gspo_token"]
# Log-ratios are clamped to +-MAX_LOG_RATIO before `exp`: a token whose probability moved by
# e^20 is clipped (or dual-clipped) anyway, and exp of a huge log-ratio is inf, whose gradient
# through min/where turns into NaN.
MAX_LOG_RATIO = 20.0
OffPolicy = Literal["tis", "mask", "none"]
Count = int | Tensor | None


def active_mask(mask: Tensor, stale_mask: Tensor | None = None, offpolicy: OffPolicy = "tis") -> Tensor:
    """Bool [batch, seq]: the tokens that get a gradient (stale ones removed under "mask").

    Count its `sum()` over a whole step to pass `num_tokens` when accumulating micro-batches.
    """
    active = mask.to(torch.bool)
    if offpolicy == "mask" and stale_mask is not None:
        active = active & ~stale_mask.to(torch.bool)
    return active


def clipped_objective(
    ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float, clip_c: float | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The PPO objective (to maximise) and where its low, high and dual clips are active.

    Low clip: w < 1 - clip_low with A < 0; high clip: w > 1 + clip_high with A > 0; dual clip
    (when clip_c is set): A < 0 and the objective would fall below clip_c * A.
    """
    plain = ratio * adv
    objective = torch.minimum(plain, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    low = (ratio < 1 - clip_low) & (adv < 0)
    high = (ratio > 1 + clip_high) & (adv > 0)
    dual = torch.zeros_like(low)
    if clip_c is not None:
        floor = clip_c * adv
        dual = (adv < 0) & (objective < floor)
        objective = torch.where(dual, floor, objective)
    return objective, low, high, dual


def k3(log_ratio: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(q || p) per sample x ~ q, given log p(x) - log q(x)."""
    log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.expm1(log_ratio) - log_ratio


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    stale_mask: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    loss: LossName = "grpo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
    kl_coef: float = 0.0,
    offpolicy: OffPolicy = "tis",
    tis_cap: float = 2.0,
    dr_grpo_length: int | None = None,
    entropy: Tensor | None = None,
    num_sequences: Count = None,
    num_tokens: Count = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar loss to minimise and the statistics to log.

    Tensors are [batch, seq], padded; `mask` (bool or 0/1) marks response tokens. `advantages`
    is [batch] (one per sample) or [batch, seq]. Only `logprobs` carries a gradient;
    `old_logprobs` and `behaviour_logprobs` are used as constants. `stale_mask` marks tokens
    produced by an older policy version. `ref_logprobs` enables the k3 KL term (required when
    kl_coef > 0; when given with kl_coef == 0 it is only logged). `entropy` [batch, seq] is only
    logged. `num_sequences` / `num_tokens`: the whole step's sample count / active-token count
    when this call sees one micro-batch of it, so the micro-batch losses sum to the step's loss.

    Stats are detached 0-dim tensors (call `.item()` when logging): loss, pg_loss, kl_loss, the
    surrogate's parts pg_loss/pos_adv and pg_loss/neg_adv (they sum to pg_loss; with one update
    and no KL the loss reads ~0 while these do not), clip_ratio/{low,high,dual}_mean,
    ratio/{mean,min,max}, is_weight/{mean,min,max,truncated_frac}, kl_old (KL(pi_old || pi_theta)),
    kl_behaviour (KL(behaviour || pi_old)), kl_ref (when ref given), entropy (when given),
    advantage/abs_mean, tokens/active, tokens/stale. Sequence-level for gspo where it applies.
    """
    if loss not in REDUCTION:
        raise ValueError(f"unknown loss {loss!r} (expected one of {sorted(REDUCTION)})")
    if offpolicy not in ("tis", "mask", "none"):
        raise ValueError(f"unknown offpolicy {offpolicy!r} (expected tis, mask or none)")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")

    active = active_mask(mask, stale_mask, offpolicy)
    adv = advantages.to(logprobs.dtype)
    adv_tok = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(logprobs)
    old = old_logprobs.detach()
    log_w = torch.where(active, logprobs - old, 0.0)
    log_mismatch = torch.where(active, old - behaviour_logprobs.detach(), 0.0)
    log_is = log_mismatch if offpolicy == "tis" else torch.zeros_like(log_mismatch)

    if loss == "gspo":  # one ratio, advantage and importance weight per sequence
        log_ratio = masked_mean(log_w, active, dim=-1)
        unit_adv = adv if adv.dim() == 1 else masked_mean(adv_tok, active, dim=-1)
        unit_active = active.any(dim=-1)
        log_is = masked_mean(log_is, active, dim=-1)
    else:
        log_ratio = log_w
        if loss == "gspo_token":  # value of the sequence ratio, gradient of each token's log-prob
            seq = masked_mean(log_w, active, dim=-1).detach().unsqueeze(-1)
            log_ratio = torch.where(active, logprobs - logprobs.detach() + seq, 0.0)
        unit_adv, unit_active = adv_tok, active
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    raw_is = torch.exp(log_is.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    is_weight = raw_is.clamp(max=tis_cap)
    objective, low, high, dual = clipped_objective(ratio, unit_adv, clip_low, clip_high, clip_c)
    per_unit = torch.where(unit_active, -objective * is_weight, 0.0)

    def reduce(values: Tensor, reduction: str) -> Tensor:
        if values.dim() == 1:
            return sequence_mean(values, num_sequences)
        return aggregate(values, active, reduction, num_sequences=num_sequences,
                         num_tokens=num_tokens, length=dr_grpo_length)

    reduction = REDUCTION[loss]
    pg_loss = reduce(per_unit, reduction)
    kl_loss = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
    kl_ref = None
    if ref_logprobs is not None:
        kl_ref = k3(torch.where(active, ref_logprobs.detach() - logprobs, 0.0))
        if kl_coef > 0:
            kl_loss = kl_coef * reduce(kl_ref, reduction)
    total = pg_loss + kl_loss

    with torch.no_grad():
        stats = {
            "loss": total,
            "pg_loss": pg_loss,
            "kl_loss": kl_loss,
            "pg_loss/pos_adv": reduce(torch.where(unit_adv > 0, per_unit, 0.0), reduction),
            "pg_loss/neg_adv": reduce(torch.where(unit_adv < 0, per_unit, 0.0), reduction),
            "clip_ratio/low_mean": masked_mean(low.to(ratio.dtype), unit_active),
            "clip_ratio/high_mean": masked_mean(high.to(ratio.dtype), unit_active),
            "clip_ratio/dual_mean": masked_mean(dual.to(ratio.dtype), unit_active),
            **_spread("ratio", ratio, unit_active),
            **_spread("is_weight", is_weight, unit_active),
            "is_weight/truncated_frac": masked_mean((raw_is > tis_cap).to(ratio.dtype), unit_active),
            "kl_old": masked_mean(k3(log_w), active),
            "kl_behaviour": masked_mean(k3(log_mismatch), active),
            "advantage/abs_mean": masked_mean(unit_adv.abs(), unit_active),
            "tokens/active": active.sum().to(ratio.dtype),
            "tokens/stale": _stale_count(mask, stale_mask).to(ratio.dtype),
        }
        if kl_ref is not None:
            stats["kl_ref"] = masked_mean(kl_ref, active)
        if entropy is not None:
            stats["entropy"] = masked_mean(entropy.to(ratio.dtype), mask.to(torch.bool))
    return total, {name: value.detach() for name, value in stats.items()}


def _spread(name: str, values: Tensor, where: Tensor) -> dict[str, Tensor]:
    """name/mean, name/min, name/max over the selected entries (1.0 when none is selected)."""
    anything = where.any()
    low = torch.where(where, values, torch.inf).amin()
    high = torch.where(where, values, -torch.inf).amax()
    one = torch.ones_like(low)
    return {
        f"{name}/mean": torch.where(anything, masked_mean(values, where), one),
        f"{name}/min": torch.where(anything, low, one),
        f"{name}/max": torch.where(anything, high, one),
    }


def _stale_count(mask: Tensor, stale_mask: Tensor | None) -> Tensor:
    if stale_mask is None:
        return torch.zeros((), device=mask.device)
    return (mask.to(torch.bool) & stale_mask.to(torch.bool)).sum()


def loss_options(algo: Any, max_tokens: int | None = None) -> dict[str, Any]:
    """`policy_loss` keyword arguments from an `AlgoConfig` (or any object with its fields).

    `max_tokens` (rollout.max_tokens) is Dr. GRPO's constant length when algo.dr_grpo_length
    is unset.
    """
    return {
        "loss": algo.loss,
        "clip_low": algo.clip_low,
        "clip_high": algo.clip_high,
        "clip_c": algo.clip_c,
        "kl_coef": algo.kl_coef,
        "offpolicy": algo.offpolicy,
        "tis_cap": algo.tis_cap,
        "dr_grpo_length": algo.dr_grpo_length or max_tokens,
    }
