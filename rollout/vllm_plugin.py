"""A vLLM general plugin (entry point `vllm.general_plugins`): stops vLLM's idle busy-wait on CPU hosts.

vLLM's engine core and its worker talk through shared-memory queues whose readers spin
(`sched_yield` in a loop) for a whole second after every message before they sleep on a socket
(`SpinCondition.busy_loop_s = 1` in `vllm/distributed/device_communicators/shm_broadcast.py`,
not configurable). On a GPU host that buys microseconds per step for a core nobody else needs.
On a CPU host the engine *is* the CPU: the core process spins while its worker computes, and the
worker spins through the trainer's update after every rollout, so the update gets half a core
(measured with py-spy on the 2-core demo: the worker's `sched_yield` was its top frame, and one
torch update thread ran 0.28 s alone against 0.70 s beside the spinning engine).

rollover's one-worker CPU engines run the model in the engine core (rollout/cpu_executor.py), where
no such queue exists; this matters where a worker process remains (`ROLLOVER_CPU_EXECUTOR=mp`, a
tensor-parallel CPU engine).

vLLM loads general plugins in every process it starts (its engine core and each worker), so this
is the one place our code runs there. The patch is opt-in per engine through an environment
variable the engine sets before it starts (rollout/engine.py does on CPU platforms); without it,
or if vLLM's class changed shape, the plugin does nothing.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

# Seconds a vLLM shared-memory queue reader may spin after a message before it sleeps on its
# socket; unset: vLLM's own behaviour (1 s). The engine's children inherit it from the environment.
BUSY_LOOP_ENV = "ROLLOVER_VLLM_BUSY_LOOP_S"
# Milliseconds an idle reader sleeps on its notification socket before it looks at the queue
# again. The socket loses wake-ups (measured: after a 1.3 s idle gap, 9 of 15 batches of the
# stock CPU engine stalled 5.5-40.5 s, in multiples of vLLM's 5 s recheck), so the sleep is short.
IDLE_POLL_MS = 1


def register() -> None:
    """vLLM's plugin hook: cap the queue readers' busy-wait at $ROLLOVER_VLLM_BUSY_LOOP_S seconds."""
    value = os.environ.get(BUSY_LOOP_ENV)
    if value is None:
        return
    try:
        busy_loop_s = max(0.0, float(value))
    except ValueError:
        log.warning("%s=%r is not a number of seconds; vLLM keeps its busy-wait", BUSY_LOOP_ENV, value)
        return
    cap_busy_loop(busy_loop_s)


def cap_busy_loop(busy_loop_s: float) -> bool:
    """Make every shared-memory queue reader in this process spin at most `busy_loop_s` seconds.

    Patches `SpinCondition.wait` (instances exist before plugins load, so their `__init__` is too
    late). Returns False, changing nothing, if vLLM's class is not the one this was written for."""
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return False
    condition = getattr(shm_broadcast, "SpinCondition", None)
    original = getattr(condition, "wait", None)
    if condition is None or original is None:
        return False
    original = getattr(original, "__wrapped_by_rollover__", original)  # idempotent

    def wait(self, timeout_ms: int | None = None) -> None:
        self.busy_loop_s = min(self.busy_loop_s, busy_loop_s)
        if time.monotonic() > self.last_read + self.busy_loop_s:  # idle: a bounded socket wait
            timeout_ms = IDLE_POLL_MS if timeout_ms is None else min(timeout_ms, IDLE_POLL_MS)
        return original(self, timeout_ms)

    wait.__wrapped_by_rollover__ = original  # type: ignore[attr-defined]
    condition.wait = wait
    return True
