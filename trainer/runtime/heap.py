"""The driver's garbage collector: the startup heap frozen, and the collector's time per step.

After start-up an rl-train process holds ~700k objects that live as long as it does (torch,
transformers and vLLM's modules, the model, the tokenizer). Python's cyclic collector walks
every one of them on each full (generation 2) collection, which it starts on its own whenever
enough new objects have survived: measured on the toy recipe, 5 full collections in 20 steps,
0.33-0.50 s each, every one a stall of the event loop that streams the rollout (and of the
update thread, which waits for the GIL). `freeze_startup_heap` moves what exists once the run
is built into the collector's permanent generation, which it never walks again; what the run
allocates afterwards (rollouts, metrics) is collected as before. Frozen objects are still freed
by reference counting: only a reference cycle among them would outlive the run. vLLM's engine
core does the same for its own process after its start-up. `ROLLOVER_GC_FREEZE=0` leaves the
heap as it is (the state before, for `bench/april/step_costs.py`; or to rule the freeze out).

`collector_clock()` adds up the collector's wall time between two reads (one clock per process,
one `gc.callbacks` entry), for the step metric `time/gc`: where to look when a step is slower
than its phases add up to.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)


def freeze_startup_heap(what: str) -> int:
    """Collect, then freeze every object the collector tracks now; returns how many were frozen."""
    if os.environ.get("ROLLOVER_GC_FREEZE", "1") == "0":
        log.info("%s: start-up heap not frozen (ROLLOVER_GC_FREEZE=0)", what)
        return 0
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%s: %d objects of the start-up heap frozen (full collections no longer walk them)",
             what, frozen)
    return frozen


class CollectorClock:
    """Wall seconds the cyclic collector ran (any thread, every generation) since the last `take`."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._since: float | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._since = time.perf_counter()
        elif self._since is not None:
            self._seconds += time.perf_counter() - self._since
            self._since = None

    def take(self) -> float:
        """Seconds since the last call (or since the clock was made)."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds


_clock: CollectorClock | None = None


def collector_clock() -> CollectorClock:
    """The process's one `CollectorClock` (made on first use)."""
    global _clock
    if _clock is None:
        _clock = CollectorClock()
    return _clock
