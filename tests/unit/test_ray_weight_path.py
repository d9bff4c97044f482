"""The GPU weight paths' wiring on CPU: nccl sent from the trainer through relaying engine actors,
colocated ipc in buckets. No Ray, no engine, no GPU: the actors are real `EngineHost`s (with a
recording stand-in for their AsyncLLM) behind a stand-in for Ray's actor handles, the NCCL
communicator and the CUDA-IPC export are faked; vLLM's own trainer-side NCCL engine, its worker-side
parsing, rank arithmetic and receiving run for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch

from rollover.rollout.engine_control import EngineBusyError
from rollover.rollout.weights.ipc_buckets import BucketedIpcTransport, plan_buckets
from rollover.rollout.pool import EnginePool
from rollover.rollout.remote import EngineHost, EngineLost, RemoteEngine
from rollover.rollout.settings import EngineSettings
from rollover.rollout.weights.weight_relay import WeightRelay
from rollover.rollout.weights.weight_transfer import weight_transport_for


def _model(layers: int = 4, width: int = 8) -> dict[str, torch.Tensor]:
    """A float32 model in checkpoint naming (embeddings, decoder layers, final norm)."""
    torch.manual_seed(0)
    weights = {"model.embed_tokens.weight": torch.randn(16, width)}
    for i in range(layers):
        weights[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(width, width)
        weights[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * width, width)
        weights[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(width)
    weights["model.norm.weight"] = torch.randn(width)
    return weights


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors_in(v)]
    if hasattr(value, "__dataclass_fields__"):
        return _tensors_in(vars(value))
    return []


# ---- nccl: the trainer is rank 0, the actor relays ------------------------------------------------


class FakeVllm:
    """The AsyncLLM inside an engine actor: what EngineControl and the weight-transfer RPCs call.
    Its workers join the NCCL group through vLLM's own rank arithmetic (worker_init_process_group)."""

    def __init__(self, workers: int, joins: list, busy: bool = False, fail_update: bool = False) -> None:
        self.workers, self.joins, self.busy, self.fail_update = workers, joins, busy, fail_update
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(world_size_across_dp=workers),
                                           model_config=SimpleNamespace(max_model_len=64))
        self.errored = False
        self.calls: list[str] = []
        self.init_info: dict = {}
        self.update_infos: list[dict] = []

    def get_num_unfinished_requests(self) -> int:
        return 1 if self.busy else 0

    async def pause_generation(self, **_) -> None:
        self.calls.append("pause")

    async def resume_generation(self) -> None:
        self.calls.append("resume")

    async def shutdown_weight_transfer_engine(self) -> None:
        self.calls.append("shutdown_transfer")

    async def init_weight_transfer_engine(self, request) -> None:
        from vllm.distributed.weight_transfer import nccl_common
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        assert not _tensors_in(request)
        self.calls.append("init")
        self.init_info = request.init_info
        parsed = object.__new__(NCCLWeightTransferEngine).parse_init_info(request.init_info)
        for tp_rank in range(self.workers):  # each worker computes its rank as vLLM does
            config = SimpleNamespace(data_parallel_index=0, world_size=self.workers, rank=tp_rank)
            self.joins.append(nccl_common.worker_init_process_group(parsed, config))

    async def start_weight_update(self) -> None:
        self.calls.append("start")

    async def update_weights(self, request) -> None:
        assert not _tensors_in(request)
        self.calls.append("update")
        self.update_infos.append(request.update_info)
        if self.fail_update:
            raise RuntimeError("NCCL receive failed")

    async def finish_weight_update(self, weight_version=None) -> None:
        self.calls.append("finish")


class FakeRef:
    def __init__(self, future) -> None:
        self.future = future

    def __await__(self):
        return asyncio.wrap_future(self.future).__await__()


class FakeActor:
    """A Ray actor handle over a real EngineHost on its own event-loop thread (the actor's
    process): records every method called and refuses tensors in any argument."""

    def __init__(self, host: EngineHost) -> None:
        self.host, self.called = host, []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __getattr__(self, name: str):
        def remote(*args):
            assert not _tensors_in(args), f"a tensor was sent to the actor's {name}"
            self.called.append(name)
            return FakeRef(asyncio.run_coroutine_threadsafe(getattr(self.host, name)(*args), self.loop))

        return SimpleNamespace(remote=remote)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def ray_stand_in(monkeypatch):
    """ray.remote builds FakeActors over real EngineHosts; ray.put must not be called."""
    import ray
    import vllm.distributed.weight_transfer.nccl_common as nccl_common
    import vllm.distributed.weight_transfer.nccl_engine as nccl_engine
    import vllm.distributed.weight_transfer.packed_tensor as packed_tensor

    world = SimpleNamespace(actors=[], fake_llms=[], trainer_ends=[], worker_joins=[], killed=[],
                            workers=[2, 3], busy=False, fail_update=False)

    def build(*args):
        host = EngineHost(*args)
        llm = FakeVllm(world.workers[len(world.actors)], world.worker_joins, world.busy, world.fail_update)
        host.engine._llm = llm
        world.fake_llms.append(llm)
        world.actors.append(FakeActor(host))
        return world.actors[-1]

    class Group:  # the trainer's end of one NCCL group: records what is broadcast
        def __init__(self, init_info) -> None:
            self.info, self.sent, self.thread = init_info, [], threading.get_ident()

        def broadcast(self, tensor, src, stream=None) -> None:
            assert src == 0
            self.sent.append(tensor.clone())

        def destroy(self) -> None:
            pass

    def open_endpoint(init_info):
        world.trainer_ends.append(Group(init_info))
        return world.trainer_ends[-1]

    def worker_join(master_address, master_port, rank, world_size, device):
        return SimpleNamespace(master=(master_address, master_port), rank=rank, world_size=world_size)

    def get(ref, timeout=None):
        return [r.future.result() for r in ref] if isinstance(ref, list) else ref.future.result()

    no_stream = SimpleNamespace(synchronize=lambda: None)
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_endpoint)
    monkeypatch.setattr(nccl_common, "stateless_init_process_group", worker_join)
    monkeypatch.setattr(packed_tensor, "_get_streams", lambda device, n: (no_stream,) * n)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: no_stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(ray, "remote", lambda cls: SimpleNamespace(
        options=lambda **_: SimpleNamespace(remote=build)))
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: world.killed.append(actor))
    monkeypatch.setattr(ray, "put", lambda *_: pytest.fail("nccl weights went into the object store"))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    yield world
    for actor in world.actors:
        actor.stop()


async def _start_engines(n: int) -> list[RemoteEngine]:
    settings = EngineSettings(model="m", dtype="bfloat16")
    engines = [RemoteEngine.create(settings, f"e{i}", backend="nccl") for i in range(n)]
    for engine in engines:
        await engine.start()
        if getattr(engine, "sender", None) is not None:
            engine.sender.device = torch.device("cpu")  # the trainer's GPU, here the CPU
    return engines


def _received(engine_llm: FakeVllm, sent: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM's worker-side NCCL engine receiving the trainer's broadcasts with this metadata."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo

    from rollover.rollout.weights.weight_transfer import engine_args_for

    loaded: dict[str, torch.Tensor] = {}
    model = SimpleNamespace(load_weights=lambda ws: loaded.update((n, t.clone()) for n, t in ws))
    worker = WeightTransferEngineFactory.create_engine(
        engine_args_for("nccl")["weight_transfer_config"],
        SimpleNamespace(parallel_config=None, model_config=None), torch.device("cpu"), model)
    info = NCCLWeightTransferInitInfo(**engine_llm.init_info)
    worker.packed, worker.packed_buffer_size_bytes = info.packed, info.packed_buffer_size_bytes
    worker.packed_num_buffers = info.packed_num_buffers
    incoming = iter(sent)
    worker.model_update_group = SimpleNamespace(
        broadcast=lambda t, src, stream=None: t.view(-1).copy_(next(incoming).reshape(-1)))
    for update in engine_llm.update_infos:
        worker.receive_weights(worker.parse_update_info(update))
    assert next(incoming, None) is None
    return loaded


def test_nccl_the_trainer_is_rank_0_of_one_group_per_engine_and_actors_get_metadata_only(ray_stand_in):
    world = ray_stand_in
    weights = _model()

    async def scenario():
        engines = await _start_engines(2)
        pool = EnginePool(engines)
        version = await pool.update_weights(weights)
        assert pool._weights["model.norm.weight"] is weights["model.norm.weight"]  # no copy made
        return engines, version

    engines, version = asyncio.run(scenario())
    assert version == 1 and [e.policy_version for e in engines] == [1, 1]
    for actor, llm in zip(world.actors, world.fake_llms):
        # The actor builds no sender: it relays; the engine's own load ran around the relay.
        assert isinstance(actor.host.engine.weight_transport, WeightRelay)
        assert actor.host.engine.policy_version == 1
        assert "update_weights" not in actor.called  # the tensor path
        assert [c for c in actor.called if c not in ("start",)] == [
            "shutdown_weight_transfer_engine", "init_weight_transfer_engine", "start_weight_update",
            "update_weights_info", "finish_weight_update"]
        assert llm.calls == ["shutdown_transfer", "init", "pause", "start", "update", "finish", "resume"]
    # One NCCL group per engine, opened in the driver (not on an actor's thread), trainer rank 0.
    assert len(world.trainer_ends) == 2
    actor_threads = {a.thread.ident for a in world.actors}
    by_port = {end.info.master_port: end for end in world.trainer_ends}  # engines push concurrently
    ends = [by_port[llm.init_info["master_port"]] for llm in world.fake_llms]
    for end, llm, workers in zip(ends, world.fake_llms, world.workers):
        assert end.thread not in actor_threads
        assert (end.info.rank, end.info.world_size, end.info.master_address) == (0, 1 + workers, "10.0.0.7")
        assert llm.init_info["rank_offset"] == 1 and llm.init_info["world_size"] == 1 + workers
    joins = world.worker_joins
    for end, workers in zip(ends, world.workers):  # workers 1..N of each engine, in its own group
        group = [j for j in joins if j.master[1] == end.info.master_port]
        assert sorted(j.rank for j in group) == list(range(1, workers + 1))
        assert {j.world_size for j in group} == {1 + workers}
    ports = [end.info.master_port for end in ends]
    assert ports[0] != ports[1] and {j.master for j in joins} == {("10.0.0.7", p) for p in ports}
    # Each engine's workers receive the trainer's tensors in the served dtype, from its broadcast.
    for end, llm in zip(ends, world.fake_llms):
        loaded = _received(llm, end.sent)
        assert set(loaded) == set(weights)
        for name, tensor in weights.items():
            assert loaded[name].dtype == torch.bfloat16
            assert torch.equal(loaded[name], tensor.to(torch.bfloat16))


def test_nccl_a_refused_start_broadcasts_nothing_and_keeps_the_engine(ray_stand_in):
    world = ray_stand_in
    world.busy = True

    async def scenario():
        (engine,) = await _start_engines(1)
        with pytest.raises(EngineBusyError):
            await engine.update_weights(_model(), version=3)
        assert not engine.errored and engine.policy_version == 0
        world.fake_llms[0].busy = False
        assert await engine.update_weights(_model(), version=3) == 3  # the same group, intact
        return engine

    asyncio.run(scenario())
    assert len(world.trainer_ends) == 1 and world.killed == []
    assert world.fake_llms[0].calls.count("finish") == 1


def test_nccl_a_push_failing_after_the_broadcast_began_retires_the_engine(ray_stand_in):
    world = ray_stand_in
    world.fail_update = True

    async def scenario():
        (engine,) = await _start_engines(1)
        with pytest.raises(EngineLost, match="NCCL weight push failed"):
            await engine.update_weights(_model())
        return engine

    engine = asyncio.run(scenario())
    assert engine.errored and world.killed == [world.actors[0]]


# ---- colocated ipc: bucketed ------------------------------------------------------------------


class IpcWorld:
    """A fake CUDA-IPC export that counts the staged bytes alive, and an AsyncLLM whose worker
    loads each bucket (vLLM's own update-info validation) from the exported tensors."""

    def __init__(self, fail_at_update: int | None = None) -> None:
        self.live_bytes = 0
        self.exported: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.live_at_update: list[int] = []
        self.loaded: dict[str, torch.Tensor] = {}
        self.calls: list[str] = []
        self.fail_at_update = fail_at_update

    def share(self, tensor: torch.Tensor) -> dict[str, tuple]:
        key = id(tensor)
        self.exported[key] = tensor
        self.live_bytes += tensor.numel() * tensor.element_size()
        weakref.finalize(tensor, self._freed, tensor.numel() * tensor.element_size())
        return {"GPU-0": (key,)}

    def _freed(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    async def init_weight_transfer_engine(self, request) -> None:
        assert request.init_info == {"packed": False}
        self.calls.append("init")

    async def start_weight_update(self) -> None:
        self.calls.append("start")

    async def update_weights(self, request) -> None:
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

        self.calls.append("update")
        if self.fail_at_update == self.calls.count("update"):
            raise RuntimeError("worker failed to load")
        info = IPCWeightTransferUpdateInfo(**request.update_info)
        self.live_at_update.append(self.live_bytes)
        rows = zip(info.names, info.dtype_names, info.shapes, info.ipc_handles)
        for name, dtype_name, shape, handle in rows:
            tensor = self.exported[handle["GPU-0"][0]]
            assert str(tensor.dtype) == f"torch.{dtype_name}" and list(tensor.shape) == shape
            self.loaded[name] = tensor.clone()

    async def finish_weight_update(self, weight_version=None) -> None:
        self.calls.append("finish")


def test_ipc_stages_one_bucket_at_a_time_in_the_served_dtype(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    weights = _model(layers=6)
    layer_bytes = sum(t.numel() * 2 for n, t in weights.items() if n.startswith("model.layers.0."))
    bucket = 2 * layer_bytes + layer_bytes // 2  # two and a half layers of bf16
    total = sum(t.numel() * 2 for t in weights.values())
    world = IpcWorld()
    transport = weight_transport_for("ipc", bucket_bytes=bucket, dtype=torch.bfloat16, device="cpu",
                                     share=world.share, release=lambda: None)
    asyncio.run(transport.push(world, weights.items()))
    assert world.calls[:2] == ["init", "start"] and world.calls[-1] == "finish"
    assert len(world.live_at_update) >= -(-total // bucket) > 1
    assert 0 < max(world.live_at_update) <= bucket  # never more than one bucket staged
    assert world.live_bytes == 0  # all freed after the push
    assert set(world.loaded) == set(weights)
    for name, tensor in weights.items():
        assert world.loaded[name].dtype == torch.bfloat16
        assert torch.equal(world.loaded[name], tensor.to(torch.bfloat16))


def test_ipc_buckets_end_between_layers_and_a_big_tensor_goes_alone():
    weights = _model(layers=4)
    layer_bytes = sum(t.numel() * 4 for n, t in weights.items() if n.startswith("model.layers.0."))
    buckets = plan_buckets(list(weights.items()), int(1.5 * layer_bytes))
    assert [n for b in buckets for n, _ in b] == list(weights)
    for b in buckets:
        layers = {n.split(".")[2] for n, _ in b if n.startswith("model.layers.")}
        for layer in layers:  # a layer that fits a bucket is never split
            assert {n for n, _ in b if n.startswith(f"model.layers.{layer}.")} == {
                n for n in weights if n.startswith(f"model.layers.{layer}.")}
    embed = weights["model.embed_tokens.weight"]
    norm = weights["model.norm.weight"]
    small = plan_buckets([("model.embed_tokens.weight", embed), ("model.norm.weight", norm)],
                         embed.numel() * 4 - 1)
    assert [[n for n, _ in b] for b in small] == [["model.embed_tokens.weight"], ["model.norm.weight"]]


def test_ipc_a_failed_bucket_still_finishes_the_update(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    world = IpcWorld(fail_at_update=2)
    transport = BucketedIpcTransport(64, device="cpu", share=world.share, release=lambda: None)
    with pytest.raises(RuntimeError, match="failed to load"):
        asyncio.run(transport.push(world, _model().items()))
    assert world.calls == ["init", "start", "update", "update", "finish"]
    assert world.live_bytes == 0


# ---- which backend where ----------------------------------------------------------------------


@pytest.mark.parametrize("given", [{}, {"address": "local", "placement": "colocated", "trainer_num_gpus": 1}])
def test_nccl_needs_engines_on_other_gpus(given):
    from rollover.rollout.cluster import ClusterError, weight_backend
    from rollover.rollout.config import ClusterConfig

    with pytest.raises(ClusterError, match="cluster.weight_transfer=nccl needs engines on GPUs other") as err:
        weight_backend(ClusterConfig(weight_transfer="nccl", **given), has_cuda=True)
    assert "\n" not in str(err.value)
