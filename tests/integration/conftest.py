"""One real vLLM engine (CPU build, builtin:tiny-math) for the whole pytest session.

Starting the engine costs ~20-25 s, so it starts once. AsyncLLM binds its output handler to the
event loop it first runs on, so every test runs its coroutines on one session loop (`run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os

import pytest

# Offline hub, KV-cache size and W&B mode are set for every test in tests/conftest.py.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # weight loading via collective_rpc


@pytest.fixture(scope="session")
def loop():
    """The session's event loop (the engine's output handler lives on it)."""
    loop = asyncio.new_event_loop()
    yield loop
    asyncio.set_event_loop(loop)  # unit tests' asyncio.run() may have unset it
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    asyncio.set_event_loop(None)


@pytest.fixture(scope="session")
def run(loop):
    """run(coro) -> result, on the session loop."""
    return loop.run_until_complete


@pytest.fixture(scope="session")
def tokenizer():
    from rollover.trainer.builtin.models import make_tokenizer

    return make_tokenizer()


@contextlib.contextmanager
def _serving(loop, model: str, max_model_len: int = 256):
    from rollover.rollout.engine import EngineSettings, RolloutEngine

    eng = RolloutEngine(EngineSettings(model=model, max_model_len=max_model_len))
    asyncio.set_event_loop(loop)
    eng.start()
    try:
        yield eng
    finally:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(eng.wait_idle())
        eng.shutdown()
        loop.run_until_complete(asyncio.sleep(0.1))  # let the output handler see its cancellation


@pytest.fixture(scope="session")
def serving(loop):
    """serving(model_folder) -> a context manager holding a RolloutEngine on the session loop
    (for a module that needs another model than the shared engine's)."""
    return functools.partial(_serving, loop)


@pytest.fixture(scope="session")
def engine(serving):
    """The shared RolloutEngine; tests must leave it idle (wait_idle) and may bump its version."""
    from rollover.trainer.builtin.models import resolve_model_path

    with serving(resolve_model_path("builtin:tiny-math")) as eng:
        yield eng


@pytest.fixture
def restore_engine(engine, run):
    """Put the builtin weights and version back, so the shared engine is as other tests expect."""
    from rollover.trainer.config import Recipe
    from rollover.trainer.policy import Policy

    version = engine.policy_version
    original = Policy(Recipe().model, Recipe().train.lora).engine_weights()
    yield
    run(engine.wait_idle())
    run(engine.update_weights(original, version=version))
