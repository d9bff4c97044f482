"""Aborts that arrive before their request is admitted (the engine wrapper's gate logic, no vLLM).

A request can wait at the admission gate (a keep-mode weight load closes it) or, on a Ray actor,
its abort can arrive before its stream call. Such an abort must end the request at admission:
otherwise it runs its whole budget and the scheduler waits for it until its abort timeout.
The stand-in for vLLM's AsyncLLM (test_engine_settings.RecordingLLM) records every request it is
given, so "the request never reached vLLM" is checked directly.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch
from test_engine_settings import RecordingLLM

from rollover.rollout.engine import EARLY_ABORT_MEMORY, EngineSettings, RolloutEngine

WEIGHTS = {"model.norm.weight": torch.ones(2)}


class ServingLLM(RecordingLLM):
    """Also serves requests: each streams its whole budget, one token (7) per output."""

    async def update_weight_version(self, label):
        self.calls.append(("label", label))

    async def generate(self, prompt, params, request_id):
        self.calls.append(("generate", request_id))
        for i in range(params.max_tokens):
            await asyncio.sleep(0)
            last = i == params.max_tokens - 1
            comp = SimpleNamespace(token_ids=[7], logprobs=[{7: SimpleNamespace(logprob=-0.5)}],
                                   finish_reason="length" if last else None, weight_versions=None)
            yield SimpleNamespace(finished=last, outputs=[comp])


class HeldTransport:
    """A weight push that lasts until `release` is set (the gate stays closed meanwhile)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def push(self, llm, named_tensors):
        await self.release.wait()


def make_engine():
    engine = RolloutEngine(EngineSettings(model="/models/some-llm"))
    engine._llm = llm = ServingLLM(engine)
    engine._prefix_caching = False
    engine.weight_transport = HeldTransport()
    return engine, llm


async def collect(engine, request_id, budget=6):
    return [c async for c in engine.stream([1, 2], budget, request_id=request_id)]


def generated(llm):
    return [c[1] for c in llm.calls if c[0] == "generate"]


def test_a_request_aborted_while_it_waits_for_a_keep_load_never_runs():
    engine, llm = make_engine()

    async def scenario():
        load = asyncio.create_task(engine.update_weights(WEIGHTS, keep_requests=True))
        await asyncio.sleep(0)  # the load closed the gate and is pushing
        late = asyncio.create_task(collect(engine, "late"))
        await asyncio.sleep(0.01)
        assert not engine.gate.serving.is_set() and not late.done()  # waiting at the gate
        opened = await engine.abort(["late"])
        engine.weight_transport.release.set()
        await load
        return opened, await late

    opened, chunks = asyncio.run(scenario())
    assert opened == 1  # it counts as open: the caller's abort reached it
    assert [(c.token_ids, c.finish_reason, c.versions) for c in chunks] == [([], "aborted", [])]
    assert generated(llm) == [] and not engine.active_requests and not engine.gate.aborted_early


def test_an_abort_that_arrives_before_the_request_ends_it_at_admission():
    # A Ray actor may run the abort before the stream call (and `generate` the same way).
    engine, llm = make_engine()

    async def scenario():
        assert await engine.abort(["first", "second"]) == 0  # nothing open yet
        streamed = await collect(engine, "first")
        whole = await engine.generate([1, 2], 6, request_id="second")
        other = await collect(engine, "third")  # an id nobody aborted runs as usual
        return streamed, whole, other

    streamed, whole, other = asyncio.run(scenario())
    assert [(c.token_ids, c.finish_reason) for c in streamed] == [([], "aborted")]
    assert (whole.token_ids, whole.finish_reason) == ([], "aborted")
    assert generated(llm) == ["third"] and sum(len(c.token_ids) for c in other) == 6
    assert other[-1].finish_reason == "length" and not engine.gate.aborted_early


def test_the_memory_of_early_aborts_is_bounded_and_forgets_the_oldest_first():
    engine, llm = make_engine()
    ids = [f"gone-{i}" for i in range(EARLY_ABORT_MEMORY + 500)]

    async def scenario():
        await engine.abort(ids)  # e.g. ids of requests that already ended, never to come back
        assert len(engine.gate.aborted_early) == EARLY_ABORT_MEMORY
        oldest = await collect(engine, ids[0])  # forgotten: runs
        newest = await collect(engine, ids[-1])  # remembered: ends at admission
        return oldest, newest

    oldest, newest = asyncio.run(scenario())
    assert oldest[-1].finish_reason == "length" and newest == [newest[0]]
    assert newest[0].finish_reason == "aborted" and generated(llm) == [ids[0]]
