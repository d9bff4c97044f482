"""The admission gate on its own (rollout/admission.py): no engine, no vLLM. The engine's tests
(test_engine_settings.py, test_engine_abort.py) drive it through `RolloutEngine`."""

from __future__ import annotations

import asyncio

import pytest

from rollover.rollout.admission import EARLY_ABORT_MEMORY, AdmissionGate
from rollover.rollout.engine_control import EngineBusyError, WeightLoadError


def test_a_request_waiting_at_a_closed_gate_is_stamped_with_the_version_it_opens_at():
    async def scenario():
        gate = AdmissionGate()
        gate.close("load weights")
        with pytest.raises(EngineBusyError, match=r"not serving \(load weights\): cannot sleep"):
            gate.close("sleep")
        waiting = asyncio.create_task(gate.admit("r1"))
        await asyncio.sleep(0.01)
        assert not waiting.done() and gate.waiting == {"r1"} and not gate.active
        gate.version = 3  # the load finished
        gate.open()
        assert await waiting == 3
        assert gate.active == {"r1"} and not gate.waiting and gate.why_closed == ""
        with pytest.raises(ValueError, match="already running"):
            await gate.admit("r1")
        gate.release("r1")
        assert not gate.active

    asyncio.run(scenario())


def test_aborts_sort_running_waiting_and_unknown_ids():
    async def scenario():
        gate = AdmissionGate()
        await gate.admit("running")
        gate.close("sleep")
        waiting = asyncio.create_task(gate.admit("waiting"))
        await asyncio.sleep(0.01)
        running, early = gate.sort_aborts(["running", "waiting", "not-sent-yet"])
        assert (running, early) == (["running"], 1)
        assert gate.abort_requested == {"running"} and gate.take_reabort("running")
        assert not gate.take_reabort("running")  # once
        gate.open()
        await waiting
        assert gate.take_early_abort("waiting") and not gate.take_early_abort("waiting")
        assert list(gate.aborted_early) == ["not-sent-yet"]
        gate.release("running")
        assert not gate.abort_requested

    asyncio.run(scenario())


def test_early_aborts_are_bounded_and_broken_weights_refuse_admission():
    async def scenario():
        gate = AdmissionGate()
        gate.sort_aborts(f"gone-{i}" for i in range(EARLY_ABORT_MEMORY + 5))
        assert len(gate.aborted_early) == EARLY_ABORT_MEMORY
        assert next(iter(gate.aborted_early)) == "gone-5"  # the oldest forgotten first
        gate.broken = "the load failed midway"
        with pytest.raises(WeightLoadError, match="failed midway"):
            await gate.admit("r")
        assert not gate.active

    asyncio.run(scenario())
