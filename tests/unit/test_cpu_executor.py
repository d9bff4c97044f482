"""Where a CPU engine runs its model (rollout/cpu_executor.py): the engine-core executor's arguments,
the OpenMP variables for a named core list, and the environment put back after the spawn.
The real engine's process tree and binding are checked in tests/integration (test_engine.py,
test_chat_math_engine.py)."""

from __future__ import annotations

import os

import pytest

from rollover.rollout.cpu_executor import EXECUTOR_ENV, engine_core_executor, openmp_environment, spawned_with


def test_a_one_worker_engine_runs_its_model_in_the_engine_core(monkeypatch):
    from vllm.v1.executor.abstract import Executor

    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    args, spawn_env = engine_core_executor({})
    backend = args["distributed_executor_backend"]
    # A class, not the string 'uni' that vLLM's CPU platform replaces with 'mp'.
    assert isinstance(backend, type) and issubclass(backend, Executor) and backend.__name__ == "UniProcExecutor"
    assert spawn_env == openmp_environment("1")


@pytest.mark.parametrize("extra", [{"tensor_parallel_size": 2}, {"distributed_executor_backend": "mp"}])
def test_tensor_parallel_or_a_named_executor_is_left_to_vllm(extra, monkeypatch):
    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    assert engine_core_executor(extra) == ({}, {})


def test_the_worker_process_comes_back_on_request(monkeypatch):
    monkeypatch.setenv(EXECUTOR_ENV, "mp")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    assert engine_core_executor({}) == ({}, {})


@pytest.mark.parametrize("bind, expected", [
    ("3", {"OMP_NUM_THREADS": "1", "OMP_PLACES": "{3}", "OMP_PROC_BIND": "true"}),
    ("2-4,7", {"OMP_NUM_THREADS": "4", "OMP_PLACES": "{2,3,4,7}", "OMP_PROC_BIND": "true"}),
    ("0-1|2-3", {"OMP_NUM_THREADS": "2", "OMP_PLACES": "{0,1}", "OMP_PROC_BIND": "true"}),  # rank 0's
    ("nobind", {}),
])
def test_named_cores_become_the_engine_cores_openmp_binding(bind, expected):
    assert openmp_environment(bind) == expected


@pytest.mark.parametrize("bind", ["auto", None, ""])
@pytest.mark.parametrize("available, cores", [({0, 1}, [0]), ({4, 5, 6, 7}, [4, 5, 6]), ({3}, [3])])
def test_automatic_binding_keeps_the_last_core_free_as_vllm_does(bind, available, cores, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: available)
    assert openmp_environment(bind) == {"OMP_NUM_THREADS": str(len(cores)),
                                        "OMP_PLACES": "{" + ",".join(map(str, cores)) + "}", "OMP_PROC_BIND": "true"}


def test_the_environment_is_put_back_after_the_spawn(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.delenv("OMP_PLACES", raising=False)
    with spawned_with({"OMP_NUM_THREADS": "1", "OMP_PLACES": "{0}"}):
        assert (os.environ["OMP_NUM_THREADS"], os.environ["OMP_PLACES"]) == ("1", "{0}")
    assert os.environ["OMP_NUM_THREADS"] == "8" and "OMP_PLACES" not in os.environ
    with pytest.raises(RuntimeError), spawned_with({"OMP_PLACES": "{0}"}):
        raise RuntimeError("a failed start")
    assert "OMP_PLACES" not in os.environ


def test_two_engines_starting_in_one_process_spawn_one_after_the_other(monkeypatch):
    import threading

    monkeypatch.delenv("OMP_PLACES", raising=False)
    first_in, first_may_leave, seen_by_second = threading.Event(), threading.Event(), []

    def first() -> None:
        with spawned_with({"OMP_PLACES": "{0}"}):
            first_in.set()
            first_may_leave.wait(5)

    def second() -> None:
        first_in.wait(5)
        with spawned_with({"OMP_PLACES": "{1}"}):
            seen_by_second.append(os.environ["OMP_PLACES"])

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_in.wait(5)
    threads[1].join(0.3)
    assert seen_by_second == []  # still waiting for the first spawn to finish
    first_may_leave.set()
    for t in threads:
        t.join(5)
    assert seen_by_second == ["{1}"] and "OMP_PLACES" not in os.environ
