"""Fault injection for the kill tests: `ROLLOVER_FAILPOINT=<point>:<step>[:<signal>]`.

At the named moment rl-train sends itself SIGKILL, or the signal given (`TERM`, `INT`: a stop
that arrives in exactly that phase; the run then goes on to its next safe point).

Timed kills from outside rarely land in short phases (a checkpoint write or a weight sync takes
tens of milliseconds here), so the kill test (bench/chaos/chaos.py) also names the moment. Points:

- `rollout`: step <step>'s rollout, once the engine has requests in flight;
- `update`: step <step>, after its first optimizer update (weights changed, step not counted);
- `weight_sync`: step <step>'s weight sync, with the weights file written, before the engine loads it;
- `checkpoint_write`: checkpoint <step>'s files written, its manifest not yet (a cut checkpoint);
- `checkpoint_replace`: checkpoint <step> saved again, its old folder moved aside, the new one
  not yet moved in;
- `skip_weight_push`: no signal: step <step>'s weight push does nothing and reports success (a
  transport that silently skips the update); the check after the load must stop the run.

Unset (always, outside tests) nothing is wrapped and `failpoint()` is one dictionary lookup.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from typing import Any

ENV = "ROLLOVER_FAILPOINT"


def _armed(point: str) -> int | None:
    """The step at which `point` fires, or None."""
    name, step, _ = (os.environ.get(ENV, "").split(":") + ["", ""])[:3]
    return int(step) if name == point and step.isdigit() else None


_fired = False


def _fire() -> None:
    """Send the signal ROLLOVER_FAILPOINT names (SIGKILL by default) to this process, once."""
    global _fired
    if not _fired:
        _fired = True
        name = (os.environ.get(ENV, "").split(":") + ["", ""])[2] or "KILL"
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def failpoint(point: str, step: int) -> None:
    """Fire if ROLLOVER_FAILPOINT names `point` at `step`."""
    if _armed(point) == step:
        _fire()


class _FireOnLoad:
    """An AsyncLLM stand-in whose weight-loading RPC fires the `weight_sync` point."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    async def collective_rpc(self, *args: Any, **kwargs: Any) -> Any:
        _fire()
        return await self._llm.collective_rpc(*args, **kwargs)  # a signal the run handles


def arm(trainer: Any) -> None:
    """Wrap the trainer's parts so the point named by ROLLOVER_FAILPOINT fires (no-op when unset)."""
    at = {p: _armed(p) for p in ("rollout", "update", "weight_sync", "skip_weight_push")}
    now = lambda: trainer.step + 1  # noqa: E731 - the step being trained

    if at["rollout"] is not None:
        step = trainer.scheduler.step

        async def rollout_then_fire(*args: Any, **kwargs: Any) -> Any:
            if now() != at["rollout"]:
                return await step(*args, **kwargs)
            running = asyncio.ensure_future(step(*args, **kwargs))
            while not trainer.engine.active_requests and not running.done():
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # some tokens streamed
            _fire()
            return await running

        trainer.scheduler.step = rollout_then_fire
    if at["update"] is not None:
        optimizer_step = trainer.optimizer.step

        @functools.wraps(optimizer_step)
        def update_then_fire(*args: Any, **kwargs: Any) -> Any:
            result = optimizer_step(*args, **kwargs)
            if now() == at["update"]:
                _fire()
            return result

        trainer.optimizer.step = update_then_fire
    if at["weight_sync"] is not None:
        transport = trainer.engine.weight_transport
        push = transport.push

        async def push_then_fire(llm: Any, named_tensors: Any) -> None:
            await push(_FireOnLoad(llm) if now() == at["weight_sync"] else llm, named_tensors)

        transport.push = push_then_fire
    if at["skip_weight_push"] is not None:
        transport = trainer.engine.weight_transport
        real_push = transport.push

        async def push_or_skip(llm: Any, named_tensors: Any) -> None:
            if now() != at["skip_weight_push"]:
                await real_push(llm, named_tensors)

        transport.push = push_or_skip
