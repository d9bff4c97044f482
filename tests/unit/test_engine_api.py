"""The declared engine interface (rollout/engine_api.py): every engine class has every member of
the protocols it claims, with the protocol's parameters (names, kinds, defaults) and the same
kind of call (plain, coroutine, async generator); so does every weight transport with
`WeightTransport` (rollout/weights/). Checked member by member with `inspect`, because
`runtime_checkable` isinstance checks only look for the names."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import pytest

from bench.sim.sim_engine import SimEngine, run_virtual
from rollover.rollout.engine import RolloutEngine
from rollover.rollout.engine_api import Engine, Lease, PoolMember, ProbedEngine, Router
from rollover.rollout.pool import EnginePool
from rollover.rollout.remote import RemoteEngine
from rollover.rollout.settings import EngineSettings
from rollover.rollout.weights.ipc_buckets import BucketedIpcTransport
from rollover.rollout.weights.weight_relay import WeightRelay
from rollover.rollout.weights.weight_sync import SharedMemoryTransport, WeightTransport
from rollover.rollout.weights.weight_transfer import NativeWeightTransport


def protocol_members(protocol: type) -> dict[str, object]:
    """Name -> the protocol's declaration (a function, a property, or None for an annotation),
    over the protocol and the protocols it extends."""
    members: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if not getattr(klass, "_is_protocol", False) or klass.__module__ == "typing":
            continue
        for name in klass.__dict__.get("__annotations__", {}):
            members[name] = None
        for name, value in vars(klass).items():
            if not name.startswith("_"):
                members[name] = value
    return members


def call_kind(function: object) -> str:
    if inspect.isasyncgenfunction(function):
        return "async generator"
    return "coroutine" if inspect.iscoroutinefunction(function) else "plain"


def mismatches(protocol: type, instance: object) -> list[str]:
    """How `instance`'s class departs from `protocol` (empty: it satisfies it). A class may be
    given for a protocol of methods only."""
    cls = instance if isinstance(instance, type) else type(instance)
    found = []
    for name, declared in protocol_members(protocol).items():
        if not hasattr(instance, name):
            found.append(f"{name}: missing")
            continue
        static = inspect.getattr_static(instance, name)
        if declared is None or isinstance(declared, property):  # data: an attribute or property
            if callable(static) and not isinstance(static, property):
                found.append(f"{name}: a method, declared as data")
            elif declared is None and isinstance(static, property) and static.fset is None:
                found.append(f"{name}: read-only, declared settable")
            continue
        if not callable(static) or isinstance(static, property):
            found.append(f"{name}: data, declared as a method")
            continue
        want_kind = "async generator" if "AsyncIterator" in str(declared.__annotations__.get("return")) \
            else call_kind(declared)
        if call_kind(getattr(cls, name)) != want_kind:
            found.append(f"{name}: {call_kind(getattr(cls, name))}, declared {want_kind}")
        want = list(inspect.signature(declared).parameters.values())
        have = list(inspect.signature(getattr(cls, name)).parameters.values())
        if [(p.name, p.kind) for p in have] != [(p.name, p.kind) for p in want]:
            found.append(f"{name}: parameters {[p.name for p in have]}, declared {[p.name for p in want]}")
            continue
        for w, h in zip(want, have):
            if w.default is inspect.Parameter.empty:
                continue
            if h.default is inspect.Parameter.empty:
                found.append(f"{name}: {h.name} has no default")
            elif w.default is not Ellipsis and h.default != w.default:
                found.append(f"{name}: {h.name} defaults to {h.default!r}, declared {w.default!r}")
    return found


SETTINGS = EngineSettings(model="unused: no engine starts here")


def engines() -> dict[str, tuple[object, tuple[type, ...]]]:
    """One instance of each engine class (none started) and the protocols it claims."""
    return {
        "RolloutEngine": (RolloutEngine(SETTINGS), (ProbedEngine, PoolMember)),
        "RemoteEngine": (RemoteEngine(SimpleNamespace(), SETTINGS, "e0"), (ProbedEngine, PoolMember)),
        "EnginePool": (EnginePool([SimEngine(0), SimEngine(1)]), (ProbedEngine, Router)),
        "SimEngine": (SimEngine(0), (Engine, PoolMember)),
    }


@pytest.mark.parametrize("name", ["RolloutEngine", "RemoteEngine", "EnginePool", "SimEngine"])
def test_each_engine_class_has_the_declared_members_and_signatures(name):
    instance, protocols = engines()[name]
    for protocol in protocols:
        assert mismatches(protocol, instance) == [], f"{name} is not a {protocol.__name__}"


def test_the_check_catches_a_missing_member_a_renamed_parameter_and_a_sync_coroutine():
    class Wrong(SimEngine):
        async def abort(self, ids):  # renamed parameter
            return 0

        def wake_up(self) -> None:  # plain, declared a coroutine
            pass

    wrong = Wrong(0)
    assert mismatches(Engine, wrong) == [
        "abort: parameters ['self', 'ids'], declared ['self', 'request_ids']",
        "wake_up: plain, declared coroutine",
    ]
    assert mismatches(ProbedEngine, SimEngine(0)) == ["weight_probe: missing"]  # it has no weights


def test_only_a_pool_routes():
    found = {name: instance.router() for name, (instance, _) in engines().items()}
    pool = found.pop("EnginePool")
    assert isinstance(pool, EnginePool) and not any(found.values())


def test_a_lease_has_the_declared_members():
    async def scenario():
        pool = EnginePool([SimEngine(0)])
        lease = await pool.acquire(3)
        assert mismatches(Lease, lease) == []

    asyncio.run(scenario())


def test_a_pool_streams_one_request_on_its_least_loaded_engine():
    """`EnginePool.stream`: the request is counted in its engine's load while it runs, a second
    one goes to the other engine, and both loads are back to zero at the end."""

    async def scenario():
        a, b = SimEngine("a"), SimEngine("b")
        pool = EnginePool([a, b])
        seen_loads = []

        async def request(budget: int) -> list:
            chunks = []
            async for chunk in pool.stream([1, 2], budget):
                chunks.append(chunk)
                seen_loads.append(pool.load())
            return chunks

        first, second = await asyncio.gather(request(40), request(20))
        return first, second, seen_loads, pool.load(), a.tokens, b.tokens

    first, second, seen_loads, end_load, a_tokens, b_tokens = run_virtual(scenario())
    assert sum(len(c.token_ids) for c in first) == 40 and first[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in second) == 20 and second[-1].finish_reason == "length"
    assert (a_tokens, b_tokens) == (40, 20)  # the second request went to the idle engine
    assert seen_loads[0][0] > 0 and seen_loads[0][1] > 0  # both counted while running
    assert end_load == [0, 0]


@pytest.mark.parametrize("transport", [SharedMemoryTransport, BucketedIpcTransport, NativeWeightTransport,
                                       WeightRelay])
def test_each_weight_transport_is_a_weight_transport(transport):
    assert mismatches(WeightTransport, transport) == []
