"""The vLLM plugin that stops the CPU engine's idle spin (rollout/vllm_plugin.py), on vLLM's own
shared-memory queue condition: a real zmq notification socket, no engine."""

from __future__ import annotations

import time

import pytest
import zmq

from rollover.rollout import vllm_plugin

shm_broadcast = pytest.importorskip("vllm.distributed.device_communicators.shm_broadcast")


@pytest.fixture
def reader(monkeypatch):
    """A reader SpinCondition (and its writer) after the plugin ran with a 50 ms window."""
    monkeypatch.setattr(shm_broadcast.SpinCondition, "wait", shm_broadcast.SpinCondition.wait)  # undone after
    monkeypatch.setenv(vllm_plugin.BUSY_LOOP_ENV, "0.05")
    vllm_plugin.register()
    context = zmq.Context()
    address = f"ipc:///tmp/rollover-plugin-test-{time.monotonic_ns()}"
    writer = shm_broadcast.SpinCondition(is_reader=False, context=context, notify_address=address)
    condition = shm_broadcast.SpinCondition(is_reader=True, context=context, notify_address=address)
    yield condition, writer
    context.destroy(linger=0)


def test_the_busy_window_is_capped_at_the_setting(reader):
    condition, _ = reader
    assert condition.busy_loop_s == 1  # vLLM's own window, set before plugins load
    condition.record_read()
    condition.wait(timeout_ms=1000)  # within the window: a yield, no socket wait
    assert condition.busy_loop_s == 0.05


def test_an_idle_reader_looks_again_within_milliseconds_not_at_the_timeout(reader):
    """No notification comes (as when the socket loses one): vLLM's wait sleeps the whole timeout
    (5 s in its read loop); the patched wait returns after its short poll."""
    condition, _ = reader
    condition.last_read = time.monotonic() - 10  # idle for 10 s
    started = time.monotonic()
    condition.wait(timeout_ms=3000)
    assert time.monotonic() - started < 1.0


def test_register_is_idempotent_and_off_without_the_variable(monkeypatch):
    # vLLM runs the plugin in this process too once an engine started here (the session's).
    monkeypatch.setattr(shm_broadcast.SpinCondition, "wait", shm_broadcast.SpinCondition.wait)
    before = shm_broadcast.SpinCondition.wait
    vllms_own = getattr(before, "__wrapped_by_rollover__", before)
    monkeypatch.delenv(vllm_plugin.BUSY_LOOP_ENV, raising=False)
    vllm_plugin.register()
    assert shm_broadcast.SpinCondition.wait is before
    monkeypatch.setenv(vllm_plugin.BUSY_LOOP_ENV, "0")
    vllm_plugin.register()
    vllm_plugin.register()
    assert shm_broadcast.SpinCondition.wait.__wrapped_by_rollover__ is vllms_own


def test_a_bad_setting_leaves_vllm_alone(monkeypatch, caplog):
    monkeypatch.setattr(shm_broadcast.SpinCondition, "wait", shm_broadcast.SpinCondition.wait)
    before = shm_broadcast.SpinCondition.wait
    monkeypatch.setenv(vllm_plugin.BUSY_LOOP_ENV, "soon")
    vllm_plugin.register()
    assert shm_broadcast.SpinCondition.wait is before
    assert "not a number" in caplog.text
