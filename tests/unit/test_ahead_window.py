"""Where a trainer step's time went (`RolloutAhead.window_metrics`), measured on a real clock."""

import time
from types import SimpleNamespace

from rollover.rollout.pipeline import RolloutAhead


def test_a_fresh_window_leaves_out_what_came_before_it():
    ahead = RolloutAhead(SimpleNamespace(engine=SimpleNamespace(policy_version=0)), max_async=1)
    ahead.trainer_busy.start()
    time.sleep(0.2)  # busy before the window starts (an evaluation, a save)
    ahead.trainer_busy.stop()
    ahead.start_window()
    time.sleep(0.2)  # idle inside the window
    assert ahead.window_metrics()["pipeline/trainer_busy"] < 0.25  # ~0; 0.5 if the busy time leaked in
    ahead.trainer_busy.start()
    time.sleep(0.2)
    figures = ahead.window_metrics()  # the interval under way counts up to now
    assert figures["pipeline/trainer_busy"] > 0.75 and figures["pipeline/engine_busy"] == 0.0
