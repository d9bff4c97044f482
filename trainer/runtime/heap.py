"""The driver's garbage collector, set for a long run: the start-up heap frozen, young
collections rarer, and the collector's time per step.

Python's cyclic collector walks every tracked object on each full (generation 2) collection,
and starts one whenever enough objects have survived the younger generations. Two things make
that expensive here:
- After start-up an rl-train process holds ~700k objects that live as long as it does (torch,
  transformers and vLLM's modules, the model, the tokenizer). On the demo recipe, left as they
  are, they made 4-5 full collections of 0.33-0.68 s each in 25 steps: stalls of the event loop
  that streams the rollout (and of the update thread, which waits for the GIL).
- A rollout allocates objects per group in flight (samples and their token lists, a task,
  coroutine and stream per request; ~180 per group in the simulator, its engines' included),
  which live for a fraction of a step. With generation 0 collected every 700 allocations they
  survive into the older generations and set off full collections: simulated at 256 engines
  (2,048 groups in flight, `bench/sim/collector.py`), 26 full collections and 10.3 s of
  collector time in a 20.4 s run.

`tune_collector` freezes what exists once the run is built (the collector's permanent
generation, never walked again; frozen objects are still freed by reference counting, only a
reference cycle among them would outlive the run), and collects generation 0 every
`YOUNG_THRESHOLD` allocations instead of 700, so a request's short-lived objects die young: the
same simulation then made no full collection and 1.1 s of collector time in a 10.2 s run (at
1,024 engines: 8.3 s against 56 s). vLLM's engine core freezes its own process's start-up heap
the same way. `ROLLOVER_GC_TUNING=0` leaves Python's defaults (the state before, for the
benchmarks; or to rule it out).

`collector_clock()` adds up the collector's wall time between two reads (one clock per process,
one `gc.callbacks` entry), for the step metric `time/gc`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 50_000  # allocations between generation-0 collections (Python's default: 700)
THRESHOLDS = (YOUNG_THRESHOLD, 20, 10)  # generations 1 and 2: collected every 20, 10 younger ones


def tune_collector(what: str) -> int:
    """Freeze every object the collector tracks now (after a collection) and make young
    collections rarer; returns how many objects were frozen."""
    if os.environ.get("ROLLOVER_GC_TUNING", "1") == "0":
        log.info("%s: Python's garbage collector left as it is (ROLLOVER_GC_TUNING=0)", what)
        return 0
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    frozen = gc.get_freeze_count()
    log.info("%s: %d objects of the start-up heap frozen (full collections no longer walk them); "
             "collector thresholds %s", what, frozen, THRESHOLDS)
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
