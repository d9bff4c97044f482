"""rank 0's `LeaderLearner` without real ranks: what it announces, and which errors it turns into
`TrainerRankLost` (a collective that failed) and which it passes on (the run's own outcomes)."""

from __future__ import annotations

import multiprocessing

import pytest

from rollover.trainer.distributed.mirror import Followers, LeaderLearner, TrainerRankLost
from rollover.trainer.update import NonFiniteLoss


class Recorder:
    def __init__(self):
        self.sent = []

    def send(self, command):
        self.sent.append(command)


class Learner:
    policy = None

    def __init__(self, error: BaseException | None = None):
        self.error = error

    def update(self, rows, *, version, step):
        if self.error is not None:
            raise self.error
        return {"updates": 1.0, "rows": len(rows)}


def leader(error=None, processes=()):
    channel = Recorder()
    return LeaderLearner(Learner(error), channel, Followers(list(processes))), channel


def test_each_call_is_announced_before_it_runs_here():
    learner, channel = leader()
    assert learner.update([1, 2, 3], version=4, step=7) == {"updates": 1.0, "rows": 3}
    assert channel.sent == [("update", ([1, 2, 3],), {"version": 4, "step": 7})]


def test_a_refused_update_is_the_runs_outcome_not_a_lost_rank():
    learner, _ = leader(NonFiniteLoss("loss is nan; no update applied"))
    with pytest.raises(NonFiniteLoss):
        learner.update([], version=0, step=0)


def test_a_failed_collective_is_one_line_naming_the_dead_rank():
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    learner, _ = leader(processes=[dead])
    with pytest.raises(TrainerRankLost, match=r"trainer rank 1 is gone \(exit code 0\)"):
        learner.update([], version=0, step=0)  # found dead before anything is announced


def test_a_failed_collective_with_every_rank_alive_is_still_one_line(monkeypatch):
    monkeypatch.setattr("rollover.trainer.distributed.mirror.DEATH_GRACE_S", 0.0)
    learner, _ = leader(RuntimeError("[gloo] Connection closed by peer\nmore detail"))
    with pytest.raises(TrainerRankLost, match=r"a trainer collective failed \(\[gloo\] Connection closed by peer\)$"):
        learner.update([], version=0, step=0)


class Script:
    """A follower's command channel replaying `commands` (then nothing: a hang would show)."""

    def __init__(self, commands):
        self.commands = list(commands)

    def receive(self):
        return self.commands.pop(0)


def test_a_follower_ends_quietly_on_the_runs_own_error():
    from rollover.tasks.errors import RolloverError
    from rollover.trainer.distributed.mirror import follow

    update = ("update", ([],), {"version": 0, "step": 0})
    channel = Script([update, update])
    follow(Learner(RolloverError("checkpoint x: its sharded trainer state does not load")), channel)
    assert channel.commands == [update]  # returned at the first error, no traceback
