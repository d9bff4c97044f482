"""Policy losses: hand-computed examples, identities between variants, gradient checks."""

import math

import pytest
import torch

from rollover.algos.losses import loss_options, policy_loss

LOSSES = ["grpo", "dapo", "dr_grpo", "bnpo", "gspo", "gspo_token"]


def _from_ratios(ratios, old=-1.0, dtype=torch.float64):
    """(logprobs requiring grad, old logprobs) with exp(logprobs - old) = ratios."""
    ratios = torch.tensor(ratios, dtype=dtype)
    old_lp = torch.full_like(ratios, old)
    return (old_lp + ratios.log()).requires_grad_(), old_lp


def _loss(lp, old, adv, mask, **kw):
    kw.setdefault("offpolicy", "none")
    kw.setdefault("dr_grpo_length", 4)
    behaviour = kw.pop("behaviour", old)
    return policy_loss(lp, old, behaviour, adv, mask, **kw)


def _grad(value, lp):
    (grad,) = torch.autograd.grad(value, lp)
    return grad


def _assert_same_loss(a, b, lp):
    """Same value and same gradient with respect to `lp`."""
    assert a.item() == pytest.approx(b.item())
    torch.testing.assert_close(_grad(a, lp), _grad(b, lp))


# Shared example: two samples; the second has one response token.
#   token (0,0): w 1.5, A  1 -> high clip, term -1.2, no gradient
#   token (0,1): w 0.9, A  1 -> term -0.9, d term / d lp = -0.9
#   token (1,0): w 0.5, A -2 -> low clip, term +1.6, no gradient
RATIOS = [[1.5, 0.9], [0.5, 1.0]]
MASK = torch.tensor([[1, 1], [1, 0]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "loss, expected, grad01",
    [
        ("grpo", 0.275, -0.225),  # seq means -1.05 and 1.6, mean 0.275; grad -0.9 / 2 / 2
        ("dapo", -0.5 / 3, -0.3),  # (-1.2 - 0.9 + 1.6) / 3 tokens; grad -0.9 / 3
        ("bnpo", -0.5 / 3, -0.3),
        ("dr_grpo", -0.0625, -0.1125),  # -0.5 / (4 * 2); grad -0.9 / 8
    ],
)
def test_token_losses_hand_computed(loss, expected, grad01):
    lp, old = _from_ratios(RATIOS)
    value, stats = _loss(lp, old, ADV, MASK, loss=loss)
    assert value.item() == pytest.approx(expected, abs=1e-9)
    expected_grad = torch.tensor([[0.0, grad01], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(_grad(value, lp), expected_grad)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert stats["ratio/min"].item() == pytest.approx(0.5)
    assert stats["ratio/max"].item() == pytest.approx(1.5)
    assert stats["ratio/mean"].item() == pytest.approx(2.9 / 3)
    assert stats["tokens/active"].item() == 3
    parts = stats["pg_loss/pos_adv"] + stats["pg_loss/neg_adv"]
    assert parts.item() == pytest.approx(stats["pg_loss"].item())


def test_grpo_surrogate_parts_hand_computed():
    lp, old = _from_ratios(RATIOS)
    _, stats = _loss(lp, old, ADV, MASK, loss="grpo")
    assert stats["pg_loss/pos_adv"].item() == pytest.approx(-0.525)  # -1.05 / 2
    assert stats["pg_loss/neg_adv"].item() == pytest.approx(0.8)  # 1.6 / 2


def test_gspo_hand_computed():
    # seq 0: mean log w 0.2 -> ratio e^0.2 = 1.2214 > 1.2 with A = 1: clipped, term -1.2.
    # seq 1: mean log w 0.0 -> ratio 1, A = -2: term 2; d/d lp_t = -A * 1 * (1/2) / 2 seqs = 0.5.
    old = torch.full((2, 2), -1.0, dtype=torch.float64)
    lp = (old + torch.tensor([[0.1, 0.3], [-0.1, 0.1]], dtype=torch.float64)).requires_grad_()
    value, stats = _loss(lp, old, ADV, torch.ones(2, 2), loss="gspo")
    assert value.item() == pytest.approx(0.4)
    torch.testing.assert_close(_grad(value, lp), torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.5)  # one of two sequences
    assert stats["ratio/max"].item() == pytest.approx(math.exp(0.2))


def test_gspo_token_with_token_advantages_hand_computed():
    # w = 1 everywhere, token advantages (1, -1): value mean(1, -1) = 0, and each token's
    # gradient is -A_t * ratio / 2 tokens = (-0.5, 0.5); gspo (one mean advantage, 0) has none.
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    value, _ = _loss(lp, lp.detach(), adv, torch.ones(1, 2), loss="gspo_token")
    assert value.item() == 0.0
    torch.testing.assert_close(_grad(value, lp), torch.tensor([[-0.5, 0.5]], dtype=torch.float64))
    value, _ = _loss(lp, lp.detach(), adv, torch.ones(1, 2), loss="gspo")
    assert torch.all(_grad(value, lp) == 0)


def test_dual_clip_hand_computed():
    # w 4, A -2: plain objective -8, the clipped one -2.4, their min -8; clip_c 3 floors it at -6.
    lp, old = _from_ratios([[4.0]])
    adv = torch.tensor([-2.0], dtype=torch.float64)
    value, stats = _loss(lp, old, adv, torch.ones(1, 1), clip_c=3.0)
    assert value.item() == pytest.approx(6.0)
    assert _grad(value, lp).item() == 0.0
    assert stats["clip_ratio/dual_mean"].item() == 1.0
    value, stats = _loss(lp, old, adv, torch.ones(1, 1))
    assert value.item() == pytest.approx(8.0)
    assert _grad(value, lp).item() == pytest.approx(8.0)  # -A * w
    assert stats["clip_ratio/dual_mean"].item() == 0.0


def test_truncated_importance_weights_hand_computed():
    # on-policy w = 1, A = 1; engine weights exp(old - behaviour) = 1.5 and 4 (truncated to 2).
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    lp = old.clone().requires_grad_()
    behaviour = old - torch.tensor([[math.log(1.5), math.log(4.0)]], dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    value, stats = _loss(lp, old, adv, torch.ones(1, 2), behaviour=behaviour, offpolicy="tis", tis_cap=2.0)
    assert value.item() == pytest.approx(-1.75)  # -(1.5 + 2) / 2
    torch.testing.assert_close(_grad(value, lp), torch.tensor([[-0.75, -1.0]], dtype=torch.float64))
    assert stats["is_weight/min"].item() == pytest.approx(1.5)
    assert stats["is_weight/max"].item() == pytest.approx(2.0)
    assert stats["is_weight/mean"].item() == pytest.approx(1.75)
    assert stats["is_weight/truncated_frac"].item() == pytest.approx(0.5)
    # KL(behaviour || old) by k3: mean of (1.5 - 1 - ln 1.5, 4 - 1 - ln 4) = (0.094535, 1.613706)
    assert stats["kl_behaviour"].item() == pytest.approx((0.0945349 + 1.6137056) / 2, abs=1e-6)
    value, _ = _loss(lp, old, adv, torch.ones(1, 2), behaviour=behaviour, offpolicy="none")
    assert value.item() == pytest.approx(-1.0)


def test_stale_tokens_masked_hand_computed():
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    lp = old.clone().requires_grad_()
    stale = torch.tensor([[True, False]])
    adv = torch.tensor([1.0], dtype=torch.float64)
    value, stats = _loss(lp, old, adv, torch.ones(1, 2), stale_mask=stale, offpolicy="mask")
    assert value.item() == pytest.approx(-1.0)
    torch.testing.assert_close(_grad(value, lp), torch.tensor([[0.0, -1.0]], dtype=torch.float64))
    assert stats["tokens/active"].item() == 1
    assert stats["tokens/stale"].item() == 1


def test_k3_kl_hand_computed():
    # ref - lp = ln 2: k3 = 2 - 1 - ln 2 = 0.306853; d/d lp = 1 - exp(ref - lp) = -1.
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    ref = lp.detach() + math.log(2.0)
    value, stats = _loss(lp, lp.detach(), torch.zeros(1, dtype=torch.float64), torch.ones(1, 1),
                         ref_logprobs=ref, kl_coef=0.5)
    assert value.item() == pytest.approx(0.5 * 0.3068528)
    assert _grad(value, lp).item() == pytest.approx(-0.5)
    assert stats["kl_ref"].item() == pytest.approx(0.3068528)
    assert stats["kl_loss"].item() == pytest.approx(0.1534264)


def test_entropy_is_logged_over_the_mask():
    lp, old = _from_ratios(RATIOS)
    entropy = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    _, stats = _loss(lp, old, ADV, MASK, entropy=entropy)
    assert stats["entropy"].item() == pytest.approx(2.0)


# ---- identities ---------------------------------------------------------------------------


def _random_batch(batch=4, seq=5, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 3
    lp = (old + spread * torch.randn(batch, seq, generator=g, dtype=torch.float64)).requires_grad_()
    behaviour = old + spread * torch.randn(batch, seq, generator=g, dtype=torch.float64)
    ref = old + spread * torch.randn(batch, seq, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
    stale = torch.rand(batch, seq, generator=g) < 0.3
    return lp, old, behaviour, ref, adv, mask, stale


@pytest.mark.parametrize("loss", LOSSES)
def test_on_policy_single_update(loss):
    """lp == old == behaviour: w = 1, nothing clipped, loss = -(aggregated advantage)."""
    _, old, _, _, adv, mask, _ = _random_batch()
    lp = old.clone().requires_grad_()
    value, stats = policy_loss(lp, old, old, adv, mask, loss=loss, clip_c=3.0, dr_grpo_length=5)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/dual_mean", "kl_old"):
        assert stats[key].item() == 0.0
    for key in ("ratio/min", "ratio/max", "is_weight/min", "is_weight/max"):
        assert stats[key].item() == 1.0
    lengths = mask.sum(1).double()
    per_seq = {"dapo": lengths, "bnpo": lengths, "dr_grpo": lengths}.get(loss, torch.ones(4))
    norm = {"dapo": lengths.sum(), "bnpo": lengths.sum(), "dr_grpo": 5.0 * 4}.get(loss, 4.0)
    assert value.item() == pytest.approx(-(adv * per_seq).sum().item() / norm)
    # the value may be near zero, the gradient is not: -A / (tokens per sequence * sequences) etc.
    grad = _grad(value, lp)
    token_weight = {"dapo": 1 / lengths.sum(), "bnpo": 1 / lengths.sum(), "dr_grpo": 1 / 20.0}
    weight = token_weight.get(loss, 1 / (lengths * 4))
    expected = -(adv * weight).unsqueeze(1) * mask
    torch.testing.assert_close(grad, expected.expand_as(grad).double())


def test_gspo_equals_grpo_for_one_token_sequences():
    lp, old, behaviour, ref, adv, _, _ = _random_batch(batch=6, seq=1, spread=0.5)
    mask = torch.ones(6, 1, dtype=torch.bool)
    kw = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.1, offpolicy="tis")
    a, _ = policy_loss(lp, old, behaviour, adv, mask, None, ref, loss="gspo", **kw)
    b, _ = policy_loss(lp, old, behaviour, adv, mask, None, ref, loss="grpo", **kw)
    _assert_same_loss(a, b, lp)


def test_gspo_token_equals_gspo_with_sequence_advantages():
    lp, old, _, ref, adv, mask, _ = _random_batch(spread=0.2)
    kw = dict(clip_low=0.1, clip_high=0.1, kl_coef=0.05, offpolicy="none")
    a, _ = policy_loss(lp, old, old, adv, mask, None, ref, loss="gspo", **kw)
    b, _ = policy_loss(lp, old, old, adv, mask, None, ref, loss="gspo_token", **kw)
    _assert_same_loss(a, b, lp)


def test_equal_lengths_make_token_and_sequence_means_agree():
    lp, old, behaviour, _, adv, _, _ = _random_batch(spread=0.4)
    mask = torch.ones_like(lp, dtype=torch.bool)
    values = {
        loss: policy_loss(lp, old, behaviour, adv, mask, loss=loss, dr_grpo_length=5)[0]
        for loss in ("grpo", "dapo", "bnpo", "dr_grpo")
    }
    for loss in ("dapo", "bnpo", "dr_grpo"):
        assert values[loss].item() == pytest.approx(values["grpo"].item())


@pytest.mark.parametrize("loss", LOSSES)
def test_micro_batches_sum_to_the_batch_loss(loss):
    lp, old, behaviour, ref, adv, mask, stale = _random_batch(batch=6)
    kw = dict(loss=loss, kl_coef=0.1, dr_grpo_length=5, offpolicy="mask")
    whole, _ = policy_loss(lp, old, behaviour, adv, mask, stale, ref, **kw)
    tokens = (mask & ~stale).sum()
    parts = sum(
        policy_loss(lp[rows], old[rows], behaviour[rows], adv[rows], mask[rows], stale[rows], ref[rows],
                    num_sequences=6, num_tokens=tokens, **kw)[0]
        for rows in (slice(0, 2), slice(2, 6))
    )
    _assert_same_loss(parts, whole, lp)


def test_bnpo_over_three_equal_micro_batches_is_the_batch_loss():
    # Review found 3 equal micro-batches gave 3x the full-batch bnpo loss. Every token below
    # has ratio 1 and advantage 1 (term -1), so the step's token mean is -1 however it is split.
    lp = torch.zeros(6, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(6, 4, dtype=torch.bool)
    adv = torch.ones(6, dtype=torch.float64)
    parts = sum(
        policy_loss(lp[rows], lp[rows].detach(), lp[rows].detach(), adv[rows], mask[rows],
                    loss="bnpo", num_sequences=6, num_tokens=24)[0]
        for rows in (slice(0, 2), slice(2, 4), slice(4, 6))
    )
    assert parts.item() == pytest.approx(-1.0)
    # d/d lp of -(1/24) * sum(exp(lp - old)) at lp = old is -1/24 per token.
    torch.testing.assert_close(_grad(parts, lp), torch.full((6, 4), -1 / 24, dtype=torch.float64))


@pytest.mark.parametrize("loss", LOSSES)
def test_huge_log_ratio_gives_finite_loss_and_gradient(loss):
    # A token whose log-prob rose by 1000 nats: exp overflows to inf without the clamp.
    lp = torch.tensor([[1000.0, 0.0], [-1000.0, 0.0]], dtype=torch.float32, requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([-1.0, 1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    ref = torch.zeros(2, 2)
    value, _ = policy_loss(lp, old, old - 500.0, adv, mask, None, ref, loss=loss, kl_coef=0.1,
                           dr_grpo_length=2, offpolicy="tis")
    assert torch.isfinite(value)
    assert torch.isfinite(_grad(value, lp)).all()


def test_offpolicy_modes_reduce_to_none_when_nothing_is_off_policy():
    lp, old, _, _, adv, mask, _ = _random_batch()
    base, _ = policy_loss(lp, old, old, adv, mask, offpolicy="none")
    tis, _ = policy_loss(lp, old, old, adv, mask, offpolicy="tis")
    masked, _ = policy_loss(lp, old, old, adv, mask, torch.zeros_like(mask), offpolicy="mask")
    assert tis.item() == pytest.approx(base.item())
    assert masked.item() == pytest.approx(base.item())


def test_kl_to_identical_reference_is_zero_with_zero_gradient():
    lp, old, _, _, _, mask, _ = _random_batch()
    zero_adv = torch.zeros(4, dtype=torch.float64)
    value, stats = policy_loss(lp, old, old, zero_adv, mask, None, lp.detach(), kl_coef=1.0)
    assert value.item() == 0.0
    assert stats["kl_ref"].item() == 0.0
    assert torch.all(_grad(value, lp) == 0)


def test_padding_garbage_does_not_leak():
    lp, old, behaviour, ref, adv, mask, stale = _random_batch()
    pad = ~mask
    lp_pad = torch.where(pad, -torch.inf, lp.detach()).requires_grad_()
    old_pad = torch.where(pad, -torch.inf, old)
    for loss in LOSSES:
        value, stats = policy_loss(lp_pad, old_pad, old_pad, adv, mask, stale, ref, loss=loss,
                                   kl_coef=0.1, dr_grpo_length=5)
        clean, _ = policy_loss(lp, old, old, adv, mask, stale, ref, loss=loss, kl_coef=0.1, dr_grpo_length=5)
        assert value.item() == pytest.approx(clean.item())
        assert all(torch.isfinite(v) for v in stats.values())
        grad = _grad(value, lp_pad)
        assert torch.all(grad[pad] == 0) and torch.all(torch.isfinite(grad))


@pytest.mark.parametrize("loss", [name for name in LOSSES if name != "gspo_token"])
@pytest.mark.parametrize("offpolicy", ["tis", "mask"])
def test_gradcheck(loss, offpolicy):
    """gspo_token is left out by design: its gradient is not that of its value (stop-gradient)."""
    lp, old, behaviour, ref, _, mask, stale = _random_batch(batch=3, seq=4, seed=3)
    adv = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    if loss == "gspo":  # one advantage per sequence
        adv = adv[:, 0]

    def fn(x):
        return policy_loss(x, old, behaviour, adv, mask, stale, ref, loss=loss, clip_c=2.0,
                           kl_coef=0.2, offpolicy=offpolicy, tis_cap=1.2, dr_grpo_length=4)[0]

    assert torch.autograd.gradcheck(fn, (lp,))


def test_bad_arguments_raise():
    lp, old, _, _, adv, mask, _ = _random_batch()
    with pytest.raises(ValueError, match="unknown loss"):
        policy_loss(lp, old, old, adv, mask, loss="ppo")
    with pytest.raises(ValueError, match="unknown offpolicy"):
        policy_loss(lp, old, old, adv, mask, offpolicy="is")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, old, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="constant length"):
        policy_loss(lp, old, old, adv, mask, loss="dr_grpo")


def test_loss_options_from_algo_config():
    config = pytest.importorskip("rollover.trainer.config")
    algo = config.AlgoConfig(loss="dr_grpo", clip_high=0.28, clip_c=3.0)
    options = loss_options(algo, max_tokens=64)
    assert options["dr_grpo_length"] == 64 and options["clip_high"] == 0.28
    assert loss_options(config.AlgoConfig(dr_grpo_length=10), max_tokens=64)["dr_grpo_length"] == 10
    lp, old, _, _, adv, mask, _ = _random_batch()
    value, _ = policy_loss(lp, old, old, adv, mask, **options)
    assert torch.isfinite(value)
