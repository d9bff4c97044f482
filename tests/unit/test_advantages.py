"""Group-relative advantages against hand-computed values."""

import pytest
import torch

from rollover.algos.advantages import group_advantages


def test_group_std_hand_computed():
    # group 0: mean 0.5, sample std sqrt((4 * 0.25) / 3) = 0.577350; group 1 is constant.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards, "group")
    expected = torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_batch_std_hand_computed():
    # group means 0.5 and 3; batch rewards [1, 0, 3, 3]: mean 1.75, squares sum 6.75, var 2.25, std 1.5.
    rewards = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    adv = group_advantages(rewards, "batch", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1 / 3, -1 / 3], [0.0, 0.0]]))


def test_no_std_is_centred_rewards():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    adv = group_advantages(rewards, "none")
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5], [-1.0, 1.0]]))


def test_constant_group_gives_zeros_not_nan():
    adv = group_advantages(torch.full((3, 4), 0.7), "group")
    assert torch.equal(adv, torch.zeros(3, 4))


def test_single_sample_groups_and_single_reward_batch_are_zero():
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]]), "group"), torch.zeros(2, 1))
    assert torch.equal(group_advantages(torch.tensor([[3.0]]), "batch"), torch.zeros(1, 1))


@pytest.mark.parametrize("std", ["group", "batch", "none"])
def test_group_means_are_zero_and_shift_invariant(std):
    rewards = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    adv = group_advantages(rewards, std)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    shifted = group_advantages(rewards + torch.arange(5.0).unsqueeze(1), std)
    if std != "batch":  # a per-group shift changes the batch std, nothing else
        torch.testing.assert_close(shifted, adv, atol=1e-5, rtol=0)


def test_group_std_is_scale_invariant():
    rewards = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        group_advantages(rewards * 10, "group", eps=0.0), group_advantages(rewards, "group", eps=0.0)
    )


def test_integer_rewards_become_float():
    adv = group_advantages(torch.tensor([[1, 0]]), "none")
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5]]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(torch.zeros(4), "group")
    with pytest.raises(ValueError, match="std mode"):
        group_advantages(torch.zeros(2, 2), "median")
