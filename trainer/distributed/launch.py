"""Starting `train.world_size` trainer ranks from rl-train's own process (rank 0).

Why not torchrun or Ray actors: rank 0 is the process that already holds the rollout side (the
scheduler, the engines, the swarm node, the signal handling and the watchdog), so `rl-train
RECIPE` stays one command with every guarantee it had. The other ranks are spawned children
(`multiprocessing` spawn, as torch recommends with CUDA) that only train: they build the same
policy, take rank 0's weights, and follow its calls (trainer/distributed/mirror.py). One machine:
rank r uses GPU r on CUDA (NCCL), or the CPU (gloo).

Lifetime: a follower ignores Ctrl-C (rank 0 stops the ranks at a safe point), dies with rank 0
(`PR_SET_PDEATHSIG`, and rl-train's watchdog, which stops every descendant of a SIGKILLed
rl-train), and a follower's death ends the run at rank 0's next call in one line.
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing
import os
import signal
import socket

import torch
import torch.distributed as dist

from rollover.tasks.errors import UsageError
from rollover.trainer.config import Recipe
from rollover.trainer.distributed.mirror import COMMAND_TIMEOUT, Channel, Followers, LeaderLearner, follow
from rollover.trainer.distributed.sharded_learner import ShardedLearner
from rollover.trainer.policy import Policy
from rollover.trainer.runtime.cpu_split import recipe_threads
from rollover.trainer.runtime.heap import tune_collector

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # one FSDP collective (an update waits on it)
START_TIMEOUT_S = 600.0  # followers to import, load the model and join


def rank_device(rank: int) -> torch.device:
    """GPU `rank` on CUDA, else the CPU."""
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def check_world_size(world_size: int) -> None:
    """One line for a world the machine cannot hold (a GPU per rank on CUDA)."""
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise UsageError(f"train.world_size={world_size}: this machine has {torch.cuda.device_count()} GPUs "
                         "(one per trainer rank)")


def free_port() -> int:
    """A TCP port free on this machine now, for the ranks' rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, world_size: int, port: int) -> Channel:
    """Join the trainer's process group (NCCL on CUDA, gloo on CPU) and its command channel."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return Channel(dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT))


def start_ranks(policy: Policy, recipe: Recipe) -> LeaderLearner:
    """Spawn ranks 1..N-1, join them as rank 0 with `policy` (the run's, weights loaded), and
    return the learner the Trainer uses: every call of it runs on all ranks."""
    world_size = recipe.train.world_size
    check_world_size(world_size)
    port = free_port()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=follower_main, name=f"rollover-rank-{rank}", daemon=True,
                                 args=(rank, world_size, port, recipe.model_dump(mode="json"), os.getpid()))
                 for rank in range(1, world_size)]
    for process in processes:
        process.start()
    channel = _join(0, world_size, port)
    return LeaderLearner(ShardedLearner(policy, recipe), channel, Followers(processes))


def follower_main(rank: int, world_size: int, port: int, recipe_json: dict, leader_pid: int) -> None:
    """A follower rank: the same policy (rank 0's weights arrive when it is sharded), then follow."""
    _die_with(leader_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the ranks stop
    _name_process(f"rollover::rank{rank}")
    recipe = Recipe.model_validate(recipe_json)
    torch.manual_seed(recipe.train.seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(recipe_threads(recipe))
    channel = _join(rank, world_size, port)
    learner = ShardedLearner(Policy(recipe.model, recipe.train.lora, rank_device(rank)), recipe)
    tune_collector(f"trainer rank {rank}")
    try:
        follow(learner, channel)
    finally:
        dist.destroy_process_group()


def _name_process(title: str) -> None:
    """`ps` shows the rank by name (vLLM names its processes the same way)."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def _die_with(leader_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux); gone already: exit now."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: rl-train's watchdog still stops us
    if os.getppid() != leader_pid:
        os._exit(1)


