"""TRL-named step statistics, computed by hand for two small groups."""

import pytest

from rollover.rollout.types import Group, Sample
from rollover.trainer.loop import group_metrics


def sample(n_tokens: int, reward: float, reason: str = "stop") -> Sample:
    return Sample([1], [2] * n_tokens, [0.0] * n_tokens, [0] * n_tokens, reason, reward)


def test_group_metrics_by_hand():
    groups = [Group(0, {}, [sample(4, 1.0), sample(8, 0.0, "length")]),
              Group(1, {}, [sample(2, 1.0), sample(2, 1.0)])]
    m = group_metrics(groups, filtered=2)
    assert m["reward"] == pytest.approx(0.75)
    # TRL's reward_std: the sample std (n - 1) of all the step's rewards, 1, 0, 1, 1 (mean 0.75):
    # sqrt((3 * 0.25**2 + 0.75**2) / 3) = sqrt(0.25).
    assert m["reward_std"] == pytest.approx(0.5)
    assert m["frac_reward_zero_std"] == pytest.approx((2 + 1) / (2 + 2))  # 2 rejected + group 1, of 4
    assert m["completions/mean_length"] == pytest.approx(16 / 4)
    assert m["completions/max_length"] == 8
    assert m["completions/clipped_ratio"] == pytest.approx(1 / 4)
