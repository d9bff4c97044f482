"""Dynamic sampling, DAPO's soft overlong penalty and truncated-sample masking."""

import pytest
import torch

from rollover.algos.filters import drop_truncated, informative_groups, is_informative, overlong_penalty


def test_is_informative():
    assert not is_informative([1.0, 1.0, 1.0])
    assert is_informative([1.0, 0.0, 1.0])
    assert not is_informative([])
    assert not is_informative([0.5])
    assert not is_informative(torch.tensor([0.2, 0.25]), tol=0.1)
    assert is_informative(torch.tensor([0.2, 0.45]), tol=0.1)


def test_informative_groups_batched():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert informative_groups(rewards).tolist() == [False, True, False]
    with pytest.raises(ValueError):
        informative_groups(torch.zeros(3))


def test_overlong_penalty_hand_computed():
    # max 16, buffer 4: free up to 12 tokens, then -1/4 per token, -1 at 16 and beyond.
    lengths = torch.tensor([10, 12, 13, 14, 16, 20])
    got = overlong_penalty(lengths, max_tokens=16, buffer=4, penalty=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    half = overlong_penalty(lengths, max_tokens=16, buffer=4, penalty=0.5)
    torch.testing.assert_close(half, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))


def test_overlong_penalty_off_and_bad_buffer():
    assert torch.equal(overlong_penalty(torch.tensor([64, 3]), 64, 0, 1.0), torch.zeros(2))
    assert torch.equal(overlong_penalty([64, 3], 64, 8, 0.0), torch.zeros(2))
    with pytest.raises(ValueError, match="exceeds"):
        overlong_penalty(torch.tensor([5]), max_tokens=4, buffer=8)


def test_drop_truncated_float_and_bool_masks():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    truncated = torch.tensor([False, True, False])
    expected = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(drop_truncated(mask, truncated), expected)
    assert torch.equal(drop_truncated(mask.bool(), truncated), expected.bool())
    assert torch.equal(mask[1], torch.ones(3))  # the input is not modified
