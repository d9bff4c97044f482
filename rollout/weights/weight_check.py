"""Proof, after every weight load, that the engine serves the weights the trainer just sent.

Why a log-prob probe and not a weight fingerprint: the engine does not hold the trainer's tensors.
vLLM fuses them (`qkv_proj`, `gate_up_proj`), its CPU layers repack them after every
`reload_weights`, and a tied or untied head may keep a stale tensor the push never named ("Failed
to load weights" in the log): a fingerprint over the engine's parameters would need a per-model
map of its layout, and one over the tensors a worker received would not see what the model does
with them. What the engine serves is its log-probs, so the check reads those: one fixed sequence
of `PROBE_LENGTH` token ids (fixed seed, any model) is scored by the engine (`prompt_logprobs`,
one request, no sampling) and by the trainer's policy, after each load, on every engine. It is
transport- and layout-blind, works through Ray unchanged, and costs one short prefill per engine.

What it proves (measured on the CPU engine with builtin:tiny-math):
- **agreement**: the engine's probe is within `AGREE_TOL` nats/token (mean) of the trainer's.
  float32 engines agree to ~1e-6, bfloat16 to ~0.01; a different set of weights is off by nats.
- **not stale**: an update moves the probe by about lr-sized amounts (lr 1e-6: 3.6e-5 nats/token,
  lr 1e-5: 3.6e-4; the engine's move matched the trainer's to 1%), far below the bfloat16
  engine/trainer gap, so agreement alone cannot tell old weights from new. But an engine is
  deterministic: with its weights unchanged its probe is bit-identical (moved exactly 0.0). So
  once the trainer's probe has moved by more than `MOVED_FLOOR` since this engine's last
  conclusive reading, the engine's must have moved by at least `STALE_RATIO` of that; a
  transport that skipped the load leaves it where it was. Below the floor the check is
  inconclusive and keeps its references, so a transport that keeps skipping is caught once the
  updates add up.
- **version**: every engine serves the version the trainer stamps tokens with.

`within` gives every load and probe a deadline that does not wait for a stuck engine to clean up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from rollover.tasks.errors import RolloverError

if TYPE_CHECKING:
    from rollover.rollout.engine_api import ProbedEngine

PROBE_LENGTH = 32
PROBE_SEED = 20_240_917
AGREE_TOL = 0.1  # nats/token, mean |engine - trainer|
MOVED_FLOOR = 1e-4  # nats/token: below it, an update is too small to judge staleness on
STALE_RATIO = 0.1  # the engine must move at least this fraction of the trainer's move
CANCEL_GRACE_S = 5.0  # a timed-out load gets this long to put the engine's gate back

T = TypeVar("T")


class WeightSyncFailed(RolloverError, RuntimeError):
    """A weight load failed its check or its deadline: the engine may not serve the trainer's weights."""


@dataclass
class EngineReading:
    """One engine's probe: `engine` names the engine process (a replacement gets a new name)."""

    engine: str
    policy_version: int
    logprobs: list[float]


def probe_ids(vocab_size: int, length: int = PROBE_LENGTH, seed: int = PROBE_SEED) -> list[int]:
    """The fixed probe sequence: `length` token ids below `vocab_size`, the same in every run."""
    if vocab_size < 2 or length < 2:
        raise ValueError(f"a weight probe needs a vocabulary and a length of at least 2 "
                         f"(got {vocab_size}, {length})")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def prompt_token_logprobs(token_ids: list[int], prompt_logprobs: list[Any]) -> list[float]:
    """log p(token t | tokens < t) for t >= 1 from vLLM's `RequestOutput.prompt_logprobs`."""
    return [float(position[token].logprob) for token, position in zip(token_ids[1:], prompt_logprobs[1:])]


@torch.no_grad()
def trainer_probe(policy: Any, token_ids: list[int]) -> list[float]:
    """The trainer policy's log-probs of the probe (temperature 1, as the engine's prompt log-probs)."""
    ids = torch.tensor([token_ids], device=policy.device)
    logprobs, _ = policy.token_logprobs(ids, torch.ones_like(ids), temperature=1.0)
    return logprobs[0].float().tolist()


def mean_abs(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise WeightSyncFailed(f"weight probe lengths differ ({len(a)} vs {len(b)})")
    return float(torch.tensor(a, dtype=torch.float64).sub(torch.tensor(b, dtype=torch.float64)).abs().mean())


class WeightCheck:
    """Verifies probe readings against the trainer's; remembers each engine's last conclusive one."""

    def __init__(self) -> None:
        # engine name -> (its probe, the trainer's probe at the same moment)
        self._reference: dict[str, tuple[list[float], list[float]]] = {}

    def verify(self, what: str, version: int, readings: list[EngineReading],
               trainer: list[float]) -> dict[str, float]:
        """Raise WeightSyncFailed (one line, naming `what`) unless every engine serves `version`
        and the trainer's weights; return the check's metrics."""
        if not readings:
            raise WeightSyncFailed(f"{what}: no engine answered the weight probe")
        gaps = []
        for reading in readings:
            name = reading.engine
            if reading.policy_version != version:
                raise WeightSyncFailed(f"{what}: engine {name} serves policy version "
                                       f"{reading.policy_version}, the trainer expects {version}")
            gap = mean_abs(reading.logprobs, trainer)
            if gap > AGREE_TOL:
                raise WeightSyncFailed(f"{what}: engine {name}'s log-probs differ from the trainer's by "
                                       f"{gap:.3g} nats/token (tolerance {AGREE_TOL}): it serves other weights")
            gaps.append(gap)
            self._check_moved(what, name, reading.logprobs, trainer)
        return {"weights/fingerprint_ok": 1.0, "weights/probe_gap": max(gaps)}

    def _check_moved(self, what: str, name: str, engine: list[float], trainer: list[float]) -> None:
        if name not in self._reference:
            self._reference[name] = (engine, trainer)
            return
        engine_before, trainer_before = self._reference[name]
        trainer_moved = mean_abs(trainer, trainer_before)
        if trainer_moved <= MOVED_FLOOR:
            return  # too small to judge: keep the references, the moves add up
        engine_moved = mean_abs(engine, engine_before)
        if engine_moved < STALE_RATIO * trainer_moved:
            raise WeightSyncFailed(
                f"{what}: engine {name} still serves the previous weights (its probe moved "
                f"{engine_moved:.2g} nats/token, the trainer's {trainer_moved:.2g}): the weight "
                f"transport did not update it")
        self._reference[name] = (engine, trainer)

    def forget(self) -> None:
        """Drop every reference (the engines were restarted or reloaded from elsewhere)."""
        self._reference.clear()


class CheckedWeightSync:
    """The trainer's side: every load of `engine` under a deadline, then probed and verified.

    `engine` is anything with the engine's interface plus `weight_probe` (a `RolloutEngine`, a
    `RemoteEngine`, an `EnginePool`); `policy` is the trainer's (`token_logprobs`, `tokenizer`).
    """

    def __init__(self, engine: ProbedEngine, policy: Any, timeout_s: float) -> None:
        self.engine, self.policy, self.timeout_s = engine, policy, timeout_s
        self.ids = probe_ids(len(policy.tokenizer))
        self.check = WeightCheck()
        self._metrics: dict[str, float] = {}

    async def verify(self, version: int, what: str,
                     expected: Awaitable[list[float]] | None = None) -> dict[str, float]:
        """Probe every engine and the trainer; WeightSyncFailed unless they agree on `version`.
        `expected`: the trainer's probe, when the caller started it already."""
        started = time.perf_counter()
        readings = await within(self.engine.weight_probe(self.ids), self.timeout_s, f"{what}'s weight probe")
        trainer = await expected if expected is not None else trainer_probe(self.policy, self.ids)
        metrics = self.check.verify(what, version, readings, trainer)
        self._metrics = {**metrics, "time/weight_check": time.perf_counter() - started}
        return self._metrics

    async def load(self, load: Callable[[], Awaitable[int]], what: str) -> dict[str, float]:
        """Run `load` (returns the version now served) under the deadline, then verify it.

        The trainer's side of the probe runs in a thread meanwhile: its weights do not change
        during a load, and the engine's load (an RPC to its processes) leaves the trainer idle.
        """
        expected = asyncio.ensure_future(asyncio.to_thread(trainer_probe, self.policy, self.ids))
        try:
            version = await within(load(), self.timeout_s, what)
        except BaseException:
            expected.add_done_callback(_retrieve)  # the load's error is the one to raise
            raise
        return await self.verify(int(version), what, expected)

    def take_metrics(self) -> dict[str, float]:
        """The last check's metrics, once (a step without a load reports none)."""
        metrics, self._metrics = self._metrics, {}
        return metrics


async def within(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """`awaitable`'s result, or WeightSyncFailed after `seconds`.

    A timed-out call is cancelled and given `CANCEL_GRACE_S` to clean up (the engine reopens its
    admission gate and resumes vLLM's scheduler); a call stuck even then is left behind rather
    than waited for (asyncio.wait_for would wait for it).
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    task.add_done_callback(_retrieve)
    raise WeightSyncFailed(f"{what} did not finish within {seconds:g} s (rollout.weight_load_timeout_s)")


def _retrieve(task: asyncio.Future) -> None:
    """Read a left-behind task's outcome, so asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()
