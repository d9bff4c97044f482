"""Rank 0 drives, the other ranks follow: every learner call runs on all ranks in the same order.

rl-train's process is rank 0: it runs the rollout, the scheduler, the swarm and the loop, and
holds a `LeaderLearner`. Each call on it (an update, the engine's weights, a checkpoint's state,
a forward pass for the weight probe or the swarm's judge) is first announced on a command
channel, then run locally; the follower ranks (`follow`) receive the same call with the same
arguments and run it on their shards. FSDP's collectives then meet in the same order everywhere.

The channel is its own gloo group with a long timeout: a follower waits for the next command for
as long as a rollout takes. A follower that dies shows at rank 0's next call (a closed gloo
connection, or the process found dead first) as one `TrainerRankLost` line, never a traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rollover.tasks.errors import RolloverError
from rollover.trainer.batch import Row
from rollover.trainer.update import NonFiniteLoss

STOP = "stop"
COMMAND_TIMEOUT = datetime.timedelta(days=7)  # a follower waits for rank 0 as long as a rollout takes
DEATH_GRACE_S = 5.0  # after a failed collective: time for a dead rank's process to be seen dead


class TrainerRankLost(RolloverError, RuntimeError):
    """A trainer rank died or stopped answering: the run cannot go on (its last checkpoint is intact)."""


class Channel:
    """Rank 0 announces each call to the other ranks (pickled objects over a gloo group)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def send(self, command: tuple[str, tuple, dict]) -> None:
        dist.broadcast_object_list([command], src=0, group=self.group)

    def receive(self) -> tuple[str, tuple, dict]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@dataclass
class Followers:
    """The follower processes, for liveness checks and the end of the run."""

    processes: list  # multiprocessing.Process, rank 1 first

    def check(self, grace_s: float = 0.0) -> None:
        """Raise TrainerRankLost naming the first dead rank; wait up to `grace_s` for one to show
        (a collective can fail on a closed connection before the dead process is reaped)."""
        deadline = time.monotonic() + grace_s
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if not process.is_alive():
                    raise TrainerRankLost(f"trainer rank {rank} is gone (exit code {process.exitcode})")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.1)

    def join(self, timeout: float) -> None:
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(5)


class LeaderLearner:
    """Rank 0's learner: `ShardedLearner`'s interface, each call announced, then run here too."""

    def __init__(self, learner, channel: Channel, followers: Followers):
        self.learner, self.channel, self.followers = learner, channel, followers
        self._lock = threading.Lock()  # one call at a time: the ranks must see one order
        self._closed = False

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    @property
    def lr_schedule(self):
        return self.learner.lr_schedule

    @property
    def probe_policy(self) -> "MirroredPolicy":
        return MirroredPolicy(self)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run learner method `name` on every rank; rank 0's result."""
        with self._lock:
            try:
                self.followers.check()
                self.channel.send((name, args, kwargs))
                return getattr(self.learner, name)(*args, **kwargs)
            except (RolloverError, NonFiniteLoss):  # the run's own outcomes, the same on every rank
                raise
            except RuntimeError as exc:  # gloo/NCCL: a peer's connection closed, a timeout
                self.followers.check(grace_s=DEATH_GRACE_S)  # names the rank that died, if one did
                raise TrainerRankLost(f"a trainer collective failed ({_first_line(exc)})") from None

    def update(self, rows: list[Row], *, version: int, step: int) -> dict[str, Any]:
        return self.call("update", rows, version=version, step=step)

    def engine_weights(self, cast: bool = True) -> dict[str, Tensor] | None:
        return self.call("engine_weights", cast)

    def save_pretrained(self, folder: Path) -> None:
        self.call("save_pretrained", folder)

    def optimizer_state(self) -> dict[str, Any]:
        return self.call("optimizer_state")

    def save_sharded_state(self, folder: Path) -> None:
        self.call("save_sharded_state", folder)

    def load_optimizer_state(self, checkpoint: Path) -> None:
        self.call("load_optimizer_state", checkpoint)

    def close(self, timeout: float = 60.0) -> None:
        """Tell the followers to stop and wait for them (killing any that does not)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception), self._lock:
            self.followers.check()
            self.channel.send((STOP, (), {}))
        self.followers.join(timeout)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class MirroredPolicy:
    """What the weight probe and the swarm's judge read of the policy, on rank 0: each forward
    pass runs on every rank (the sharded model needs all of them), the result is rank 0's."""

    def __init__(self, leader: LeaderLearner):
        sharded = leader.learner.policy
        self.leader = leader
        self.model, self.tokenizer, self.device = sharded.model, sharded.tokenizer, sharded.device

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0):
        return self.leader.call("policy_logprobs", input_ids.cpu(), attention_mask.cpu(), temperature)


def follow(learner, channel: Channel) -> None:
    """A follower rank's loop: run each announced call until rank 0 says stop.

    A refused update (`NonFiniteLoss`) is refused on every rank alike and is not an error here;
    a run's own error (`RolloverError`, e.g. a checkpoint's shards that do not load, which DCP
    reports on every rank) ends this rank quietly: rank 0 reports it in one line.
    """
    while True:
        name, args, kwargs = channel.receive()
        if name == STOP:
            return
        forward_only = torch.no_grad() if name == "policy_logprobs" else contextlib.nullcontext()
        try:
            with forward_only:
                getattr(learner, name)(*args, **kwargs)
        except NonFiniteLoss:
            continue
        except RolloverError:
            return


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
