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
    assert m["reward_std"] == pytest.approx((0.5 + 0.0) / 2)  # population std per group, averaged
    assert m["frac_reward_zero_std"] == pytest.approx((2 + 1) / (2 + 2))  # 2 rejected + group 1, of 4
    assert m["completions/mean_length"] == pytest.approx(16 / 4)
    assert m["completions/max_length"] == 8
    assert m["completions/clipped_ratio"] == pytest.approx(1 / 4)
