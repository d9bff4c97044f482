"""The recipe's `swarm` section: SAPO over a hivemind DHT (swarm/, `rl-swarm`).

Composed into the `Recipe` by trainer/config.py, which checks it against the rollout section.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from rollover.tasks.config import Section


class SwarmConfig(Section):
    """SAPO: share decoded rollouts with peers over a hivemind DHT (swarm/, `rl-swarm`)."""

    enabled: bool = False
    name: str = Field("rollover", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")  # DHT namespace
    initial_peers: list[str] = Field(default_factory=list)  # multiaddrs printed by `rl-swarm bootstrap`
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = Field(default_factory=list)
    identity_path: str | None = None  # folder for the node's keys; None: the run folder
    # Where this node's training problems start in the task's stream. None: a point derived from
    # the node's identity, so every peer works on other problems than its neighbours (on the same
    # ones a peer's group adds no new problem, and the copy check refuses its identical answers).
    problem_offset: int | None = Field(None, ge=0, lt=2**61)
    local_groups: int | None = Field(None, ge=1)  # I; None: rollout.groups_per_step (must match)
    external_groups: int = Field(4, ge=0)  # J: peers' groups trained on per step, when there are any
    # rounds are epochs of the wall clock; whole seconds, so a bootstrap node's DHT guard that was
    # not told the length serves the swarm anyway (swarm/guard.py)
    round_seconds: float = Field(30.0, ge=1.0, le=3600.0, multiple_of=1.0)
    max_record_bytes: int = Field(12288, ge=1024, le=16384)  # one group; hivemind's pipe breaks past ~24 KiB
    max_groups_per_peer: int = Field(16, ge=1, le=256)  # per sender per round (the pool keeps two rounds)
    max_external_share_per_peer: float = Field(0.5, gt=0.0, le=1.0)  # of J, per step
    max_completion_chars: int = Field(2048, ge=16)
    # The likelihood filter (swarm/inbox.py, calibrated by bench/swarm/likelihood_filter.py): a peer's
    # group is refused when its median completion lies likelihood_z robust deviations below our own
    # samples (scored by the same policy), or any completion it would reinforce likelihood_z_each.
    likelihood_z: float = Field(4.0, gt=0.0)  # the group's median completion, in robust deviations
    likelihood_z_each: float = Field(6.0, gt=0.0)  # each completion with reward above the group's mean
    likelihood_floor: float = Field(0.3, gt=0.0)  # nats/token: the least deviation (a sharp policy's is ~0.03)

    @field_validator("initial_peers", "host_maddrs", "announce_maddrs")
    @classmethod
    def _maddrs(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.startswith("/"):
                raise ValueError(f"{value!r} is not a multiaddr (like /ip4/1.2.3.4/tcp/31337/p2p/Qm...)")
        return values
