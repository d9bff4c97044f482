"""The admission gate of one `RolloutEngine`: which requests run, which wait, which were aborted,
and the policy version each is stamped with.

Every chunk of a request carries the version the engine held when the request was admitted, so
nothing may change the weights between a request's admission and its stamping. The gate is
closed while weights load or the engine sleeps (rollout/engine_control.py): new requests wait at
it and are stamped with the version that really serves them once it opens. It also keeps the
abort bookkeeping, since an abort can reach a request before it was admitted (waiting at the
gate, or, through a Ray actor, not submitted yet): such ids are remembered and their request
ends `aborted` on admission.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable

from rollover.rollout.engine_control import EngineBusyError, WeightLoadError

# Request ids aborted before their request was admitted, remembered so the request ends at
# admission. Bounded: the oldest are forgotten first.
EARLY_ABORT_MEMORY = 10_000


class AdmissionGate:
    """Admits requests one engine serves; closed while the served weights change (module doc)."""

    def __init__(self) -> None:
        self.version = 0  # the policy version new requests are stamped with
        self.keep_loads = 0  # in-flight (keep_requests) weight loads started so far
        self.broken: str | None = None  # why the weights are unusable (a load failed midway)
        self.active: set[str] = set()  # request ids whose stream has not ended
        self.waiting: set[str] = set()  # request ids waiting at the gate
        self.abort_requested: set[str] = set()  # asked to abort, stream still open
        self.reabort: set[str] = set()  # aborts to repeat on the request's first output
        self.aborted_early: OrderedDict[str, None] = OrderedDict()  # see EARLY_ABORT_MEMORY
        self.serving = asyncio.Event()  # set while the gate is open
        self.serving.set()
        self.why_closed = ""

    # ---- opening and closing -----------------------------------------------------------------

    def close(self, why: str) -> None:
        """Stop admitting (new requests wait); EngineBusyError if it is closed already."""
        if not self.serving.is_set():
            raise EngineBusyError(f"engine is not serving ({self.why_closed}): cannot {why}")
        self.serving.clear()
        self.why_closed = why

    def open(self) -> None:
        self.why_closed = ""
        self.serving.set()

    # ---- requests ----------------------------------------------------------------------------

    async def admit(self, request_id: str) -> int:
        """Wait until the gate is open, register the request; return the version to stamp.

        No await between the gate check and the registration, so a weight load that closes
        the gate next sees this request as running. The caller checks `take_early_abort` next
        (no await between): an abort may have come while the request waited here.
        """
        self.waiting.add(request_id)
        try:
            while not self.serving.is_set():
                await self.serving.wait()
        finally:
            self.waiting.discard(request_id)
        if self.broken:
            raise WeightLoadError(self.broken)
        if request_id in self.active:
            raise ValueError(f"request id {request_id!r} is already running (vLLM would abort both)")
        self.active.add(request_id)
        return self.version

    def take_early_abort(self, request_id: str) -> bool:
        """True (once) if `request_id` was aborted before it was admitted."""
        if request_id not in self.aborted_early:
            return False
        del self.aborted_early[request_id]
        return True

    def release(self, request_id: str) -> None:
        """The request's stream ended."""
        self.active.discard(request_id)
        self.abort_requested.discard(request_id)
        self.reabort.discard(request_id)

    def sort_aborts(self, request_ids: Iterable[str]) -> tuple[list[str], int]:
        """File an abort: (the running ids, to abort in vLLM; how many were waiting at the gate).
        Ids not running are remembered (`take_early_abort`)."""
        running, early = [], 0
        for r in request_ids:
            if r in self.active:
                running.append(r)
                continue
            early += r in self.waiting
            self.aborted_early[r] = None
            self.aborted_early.move_to_end(r)
            if len(self.aborted_early) > EARLY_ABORT_MEMORY:
                self.aborted_early.popitem(last=False)
        self.abort_requested.update(running)
        self.reabort.update(running)
        return running, early

    def take_reabort(self, request_id: str) -> bool:
        """True (once) if the abort of `request_id` must be repeated: it may have raced the
        request's registration in vLLM."""
        if request_id not in self.reabort:
            return False
        self.reabort.discard(request_id)
        return True
