"""Engine settings and the engine wrapper's control logic (sleep, weight loads, wait_idle), no vLLM.

A recording stand-in for vLLM's AsyncLLM takes the place of the engine: these tests check what
the wrapper asks vLLM to do, and in which order; the real engine is in tests/integration.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rollover.rollout.engine import (
    EngineBusyError,
    EngineSettings,
    RolloutEngine,
    SleepModeUnavailable,
    WeightLoadError,
)
from rollover.rollout.weights.weight_sync import WeightsUntouched, _reload_from_file, pick_weights_dir
from rollover.trainer.build import engine_settings
from rollover.trainer.config import ModelConfig
from rollover.rollout.config import RolloutConfig

# ---- settings --------------------------------------------------------------------------------


def test_sleep_mode_follows_the_recipe_on_cuda():
    model = ModelConfig(path="/models/some-llm", dtype="auto")
    on = engine_settings(model, RolloutConfig(sleep_mode=True), has_cuda=True)
    off = engine_settings(model, RolloutConfig(), has_cuda=True)
    assert on.sleep_mode is True and off.sleep_mode is False
    assert on.dtype == "bfloat16" and on.enforce_eager is False  # the GPU defaults still apply


def test_sleep_mode_without_cuda_is_refused_in_one_line():
    with pytest.raises(SleepModeUnavailable) as err:
        engine_settings(ModelConfig(path="/models/some-llm"), RolloutConfig(sleep_mode=True), has_cuda=False)
    message = str(err.value)
    assert "\n" not in message and "rollout.sleep_mode" in message and "CUDA" in message
    cpu = engine_settings(ModelConfig(path="/models/some-llm"), RolloutConfig(), has_cuda=False)
    assert cpu.sleep_mode is False and cpu.dtype == "float32"


def test_a_resumed_engine_starts_from_the_checkpoint_folder():
    """rl-train passes the checkpoint as `model=`: it replaces the recipe's model path."""
    settings = engine_settings(ModelConfig(path="/models/some-llm", max_model_len=300), RolloutConfig(seed=7),
                               has_cuda=False, model="/runs/x/step-4")
    assert (settings.model, settings.max_model_len, settings.seed) == ("/runs/x/step-4", 300, 7)


# ---- a recording stand-in for AsyncLLM -------------------------------------------------------


class RecordingLLM:
    """Records the AsyncLLM calls the wrapper makes; `engine` is the wrapper (for abort)."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.calls: list[tuple] = []
        self.closes_on_abort = True

    def get_num_unfinished_requests(self) -> int:
        return 0

    async def pause_generation(self, *, mode, clear_cache):
        self.calls.append(("pause", mode, clear_cache))

    async def resume_generation(self):
        self.calls.append(("resume",))

    async def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", self.engine.policy_version))
        return True

    async def sleep(self, level):
        self.calls.append(("sleep", level))

    async def wake_up(self):
        self.calls.append(("wake_up",))
        return True

    async def abort(self, ids):
        self.calls.append(("abort", sorted(ids)))
        if self.closes_on_abort:
            for rid in ids:
                self.engine._release(rid)


class RecordingTransport:
    def __init__(self, llm: RecordingLLM, fail: BaseException | None = None) -> None:
        self.llm, self.fail = llm, fail

    async def push(self, llm, named_tensors):
        self.llm.calls.append(("push", self.llm.engine.policy_version, [n for n, _ in named_tensors]))
        if self.fail is not None:
            raise self.fail


def make_engine(sleep_mode=False, fail=None, prefix_caching=True):
    engine = RolloutEngine(EngineSettings(model="/models/some-llm", sleep_mode=sleep_mode))
    llm = RecordingLLM(engine)
    engine._llm = llm  # started, as far as the wrapper can tell
    engine._prefix_caching = prefix_caching
    engine.weight_transport = RecordingTransport(llm, fail)
    return engine, llm


WEIGHTS = {"model.norm.weight": torch.ones(2)}


# ---- weight loads ------------------------------------------------------------------------------


def test_weight_load_is_paused_around_push_cache_reset_and_version_bump():
    engine, llm = make_engine()
    assert asyncio.run(engine.update_weights(WEIGHTS)) == 1
    assert llm.calls == [
        ("pause", "keep", False),
        ("push", 0, ["model.norm.weight"]),
        ("reset_prefix_cache", 0),  # the cache is reset before the version moves
        ("resume",),
    ]
    assert engine.policy_version == 1 and engine.gate.serving.is_set()


def test_weight_load_that_fails_midway_refuses_requests_until_a_full_load():
    engine, llm = make_engine(fail=RuntimeError("worker 0 died mid-copy"))
    with pytest.raises(RuntimeError, match="mid-copy"):
        asyncio.run(engine.update_weights(WEIGHTS))
    assert engine.policy_version == 0 and llm.calls[-1] == ("resume",)
    with pytest.raises(WeightLoadError, match="failed midway"):
        asyncio.run(engine._admit("r1"))
    engine.weight_transport.fail = None
    assert asyncio.run(engine.update_weights(WEIGHTS)) == 1
    assert asyncio.run(engine._admit("r1")) == 1


def test_weight_load_that_failed_before_touching_weights_keeps_serving():
    engine, llm = make_engine(fail=WeightsUntouched("no room in /dev/shm"))
    with pytest.raises(WeightsUntouched):
        asyncio.run(engine.update_weights(WEIGHTS))
    assert asyncio.run(engine._admit("r1")) == 0  # old weights, old version, still serving


def test_weight_load_waits_for_nothing_and_refuses_a_busy_engine():
    engine, llm = make_engine()
    engine.gate.active.add("running")
    with pytest.raises(EngineBusyError, match="1 open streams"):
        asyncio.run(engine.update_weights(WEIGHTS))
    assert llm.calls == [] and engine.gate.serving.is_set()


def test_requests_admitted_during_a_weight_load_get_the_new_version():
    engine, llm = make_engine()
    stamps = []

    async def scenario():
        load = asyncio.create_task(engine.update_weights(WEIGHTS))
        await asyncio.sleep(0)  # the load has closed the gate and is pushing
        stamps.append(await engine._admit("during"))
        await load

    asyncio.run(scenario())
    assert stamps == [1]


# ---- sleep mode --------------------------------------------------------------------------------


def test_sleep_and_wake_are_noops_without_sleep_mode():
    engine, llm = make_engine(sleep_mode=False)
    asyncio.run(engine.sleep())
    asyncio.run(engine.wake_up())
    assert llm.calls == [] and not engine.asleep


def test_sleep_frees_the_engine_until_wake_up():
    engine, llm = make_engine(sleep_mode=True)

    async def scenario():
        await engine.sleep()
        assert engine.asleep
        with pytest.raises(EngineBusyError, match="asleep"):
            await engine.update_weights(WEIGHTS)
        admitted = asyncio.create_task(engine._admit("after-wake"))
        await asyncio.sleep(0.01)
        assert not admitted.done()  # new requests wait for the wake-up
        await engine.wake_up()
        assert await admitted == 0
        engine._release("after-wake")  # the request ended
        await engine.update_weights(WEIGHTS)

    asyncio.run(scenario())
    assert [c[0] for c in llm.calls] == ["sleep", "wake_up", "pause", "push", "reset_prefix_cache", "resume"]
    assert llm.calls[0] == ("sleep", 1)


def test_sleep_refuses_a_busy_engine():
    engine, llm = make_engine(sleep_mode=True)
    engine.gate.active.add("running")
    with pytest.raises(EngineBusyError):
        asyncio.run(engine.sleep())
    assert llm.calls == [] and not engine.asleep and engine.gate.serving.is_set()


# ---- wait_idle touches only its caller's requests ----------------------------------------------


def test_wait_idle_aborts_only_the_callers_requests():
    engine, llm = make_engine()
    engine.gate.active.update({"eval-1", "sched-1"})
    asyncio.run(engine.wait_idle(timeout=1, request_ids=["sched-1"]))
    assert llm.calls == [("abort", ["sched-1"])] and engine.active_requests == {"eval-1"}
    with pytest.raises(EngineBusyError):  # the whole engine is not idle: the evaluation runs on
        asyncio.run(engine.wait_idle(timeout=0.05))
    assert llm.calls == [("abort", ["sched-1"])]  # ... and it was never aborted


def test_wait_idle_repeats_an_abort_that_raced_the_request():
    engine, llm = make_engine()
    llm.closes_on_abort = False  # the first abort misses: the request was still registering
    engine.gate.active.add("sched-2")
    asyncio.run(engine.abort(["sched-2"]))
    llm.closes_on_abort = True
    asyncio.run(engine.wait_idle(timeout=1))
    assert llm.calls == [("abort", ["sched-2"]), ("abort", ["sched-2"])] and not engine.active_requests


# ---- the shared-memory transport ---------------------------------------------------------------


def test_weights_file_goes_where_it_fits(tmp_path, monkeypatch):
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir(), tmp.mkdir()
    free = {shm: 64 << 20, tmp: 10 << 30}  # Docker's default /dev/shm, a big disk
    monkeypatch.setattr("shutil.disk_usage", lambda p: SimpleNamespace(free=free[Path(p)]))
    assert pick_weights_dir(10 << 20, [shm, tmp]) == shm
    assert pick_weights_dir(500 << 20, [shm, tmp]) == tmp
    free[tmp] = 100 << 20
    with pytest.raises(WeightsUntouched) as err:
        pick_weights_dir(500 << 20, [shm, tmp])
    assert "\n" not in str(err.value) and "--shm-size" in str(err.value)


def test_workers_reload_through_the_worker_not_the_model_runner(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(path))
    called = {}

    class Runner:
        def reload_weights(self, **kw):
            called["runner"] = kw

    class Worker:
        model_runner = Runner()

        def reload_weights(self, weights_iterator, is_checkpoint_format):
            called["worker"] = (sorted(n for n, _ in weights_iterator), is_checkpoint_format)

    assert _reload_from_file(Worker(), str(path)) == 2
    assert called == {"worker": (["a", "b"], True)}
