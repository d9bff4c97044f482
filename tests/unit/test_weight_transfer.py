"""vLLM-native weight transfer (rollout/weights/weight_transfer.py): the parts that run on CPU.

Expected values come from vLLM's own code wherever it runs on CPU: its update-info dataclasses
(the workers' parse and validation), its packing/unpacking, its msgpack encoder (the AsyncLLM hop),
its engine factory, and its real NCCL trainer-side sender driven against a recording stand-in for
AsyncLLM (only the NCCL communicator and the CUDA stream are faked). No engine is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from types import SimpleNamespace

import pytest
import torch

from rollover.rollout.weights.ipc_buckets import BucketedIpcTransport
from rollover.rollout.weights.weight_relay import WeightRelay
from rollover.rollout.weights.weight_sync import SharedMemoryTransport, WeightsUntouched
from rollover.rollout.weights.weight_transfer import (
    NativeWeightTransport,
    _LoopClient,
    engine_args_for,
    engine_side_transport,
    packing_order,
    update_metadata,
    weight_transport_for,
)


def _tensors() -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(5, 3)),
        ("model.layers.0.mlp.up_proj.weight", torch.randn(4, 6, dtype=torch.bfloat16).t()),  # a view
        ("model.layers.0.input_layernorm.weight", torch.randn(7, dtype=torch.float16)),
        ("model.step", torch.tensor(3, dtype=torch.int64)),  # 0-d
    ]


@pytest.fixture(autouse=True)
def _live_vllm_envs():
    """vLLM may cache its env vars; these tests set them."""
    from vllm import envs

    envs.disable_envs_cache()


# ---- metadata, checked against vLLM's worker-side parsing --------------------------------------


def test_metadata_parses_as_vllm_nccl_update_info_and_rebuilds_each_tensor():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    pairs = _tensors()
    meta = update_metadata(pairs)
    # The worker's own parse (WeightTransferEngine.parse_update_info -> NCCLWeightTransferUpdateInfo).
    info = object.__new__(NCCLWeightTransferEngine).parse_update_info(meta)
    assert info.names == [n for n, _ in pairs]
    for (_, t), dtype_name, shape in zip(pairs, info.dtype_names, info.shapes):
        # What NCCLWeightTransferEngine.receive_weights allocates for each broadcast.
        received = torch.empty(shape, dtype=getattr(torch, dtype_name))
        assert received.dtype == t.dtype and received.shape == t.shape


def _unpack_as_vllm(pairs, buffer_size_bytes):
    """vLLM's producer packing (pack_tensors) and its consumer's unpacking, chunk by chunk, with
    the consumer's chunk layout computed from our metadata as packed_nccl_broadcast_consumer does."""
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

    meta = update_metadata(pairs)
    dtypes = [getattr(torch, d) for d in meta["dtype_names"]]
    sizes = [math.prod(s) * d.itemsize for s, d in zip(meta["shapes"], dtypes)]
    stream, out, i = iter(pairs), [], 0
    while (chunk := pack_tensors(stream, lambda item: item[1], buffer_size_bytes)) is not None:
        n = len(chunk.names)
        assert chunk.tensor_sizes == sizes[i:i + n] and chunk.names == meta["names"][i:i + n]
        out += unpack_tensor(chunk.packed_tensor, meta["names"][i:i + n], meta["shapes"][i:i + n],
                             dtypes[i:i + n], sizes[i:i + n])
        i += n
    assert i == len(pairs)
    return out


@pytest.mark.parametrize("buffer_size_bytes", [1 << 20, 64])  # one chunk; two
def test_metadata_cuts_vllm_packed_buffers_where_vllm_packs_them(buffer_size_bytes):
    pairs = packing_order(_tensors())
    for (name, t), (got_name, got) in zip(pairs, _unpack_as_vllm(pairs, buffer_size_bytes)):
        assert got_name == name and got.dtype == t.dtype and torch.equal(got, t)


def test_packing_order_is_what_keeps_vllm_packed_unpacking_aligned():
    # float16 x7 (14 bytes) then int64: vLLM cannot view the int64 at byte offset 122.
    with pytest.raises(RuntimeError, match="divisible"):
        _unpack_as_vllm(_tensors(), 1 << 20)
    ordered = packing_order(_tensors())
    assert [t.element_size() for _, t in ordered] == [8, 4, 2, 2]
    assert [n for n, _ in ordered][2:] == ["model.layers.0.mlp.up_proj.weight",
                                           "model.layers.0.input_layernorm.weight"]  # stable


def test_metadata_validates_as_vllm_ipc_update_info():
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

    meta = update_metadata(_tensors())
    handles = [{"GPU-0": ()} for _ in meta["names"]]
    IPCWeightTransferUpdateInfo(**meta, ipc_handles=handles)
    with pytest.raises(ValueError, match="ipc_handles"):
        IPCWeightTransferUpdateInfo(**meta, ipc_handles=handles[:-1])


def _ipc_payload() -> dict:
    """An update payload shaped like IPCTrainerWeightTransferEngine._do_send's (unpacked)."""
    # reduce_tensor's args for rebuild_cuda_tensor: classes, sizes, a dtype, handle bytes.
    args = (torch.Tensor, torch.Size([2, 3]), (3, 1), 0, torch.UntypedStorage, torch.bfloat16, 0,
            b"h" * 64, 12, 0, False, b"r" * 16, 0, b"e" * 64, True)
    meta = update_metadata([("w", torch.zeros(2, 3, dtype=torch.bfloat16))])
    return {"update_info": {**meta, "ipc_handles": [{"GPU-0": args}]}}


def test_ipc_handles_cross_the_asyncllm_hop_only_with_insecure_serialization(monkeypatch):
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")
    with pytest.raises(TypeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        MsgpackEncoder().encode(_ipc_payload())
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    decoded = MsgpackDecoder().decode(MsgpackEncoder().encode(_ipc_payload()))
    info = IPCWeightTransferUpdateInfo(**decoded["update_info"])
    rebuilt = info.ipc_handles[0]["GPU-0"]
    assert rebuilt[0] is torch.Tensor and rebuilt[5] is torch.bfloat16


def test_nccl_metadata_crosses_the_asyncllm_hop_without_pickle(monkeypatch):
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")
    meta = update_metadata(_tensors())
    payload = {"update_info": meta}
    assert MsgpackDecoder().decode(MsgpackEncoder().encode(payload)) == payload


# ---- choosing a transport; engine args -----------------------------------------------------------


def test_weight_transport_for_picks_the_transport(tmp_path):
    shm = weight_transport_for("shared_memory", directory=tmp_path)
    assert isinstance(shm, SharedMemoryTransport) and shm.directory == tmp_path
    ipc = weight_transport_for("ipc", bucket_bytes=1 << 20, dtype="bfloat16")
    assert isinstance(ipc, BucketedIpcTransport) and ipc.bucket_bytes == 1 << 20
    assert ipc.dtype is torch.bfloat16
    native = weight_transport_for("nccl")
    assert isinstance(native, NativeWeightTransport) and native.backend == "nccl"


def test_an_engine_host_loads_with_ipc_or_shared_memory_and_relays_nccl():
    """Inside the process hosting an engine (a Ray actor, or the trainer for the in-process
    engine) ipc and shared memory load tensors it holds; nccl never builds a sender there."""
    from rollover.rollout.settings import EngineSettings

    settings = EngineSettings(model="m", dtype="bfloat16", weight_bucket_mb=3)
    ipc = engine_side_transport("ipc", settings)
    assert isinstance(ipc, BucketedIpcTransport)
    assert (ipc.bucket_bytes, ipc.dtype) == (3 << 20, torch.bfloat16)
    assert isinstance(engine_side_transport("shared_memory", settings), SharedMemoryTransport)
    assert isinstance(engine_side_transport("nccl", settings), WeightRelay)


def test_only_a_transport_that_casts_per_bucket_gets_the_float32_masters():
    """The trainer skips its full cast copy (`engine_weights(cast=False)`) only for the in-process
    engine's bucketed ipc, which casts each bucket to the served dtype as it stages it."""
    from rollover.rollout.settings import EngineSettings
    from rollover.trainer.loop import transport_casts

    settings = EngineSettings(model="m", dtype="bfloat16")
    engine_on = lambda backend: SimpleNamespace(  # noqa: E731 - an in-process engine's attribute
        weight_transport=engine_side_transport(backend, settings))
    assert transport_casts(engine_on("ipc"))
    assert not transport_casts(engine_on("shared_memory")) and not transport_casts(engine_on("nccl"))
    assert not transport_casts(SimpleNamespace())  # a Ray pool: its actors hold the transports
    assert not transport_casts(SimpleNamespace(weight_transport=BucketedIpcTransport(dtype=None)))


def test_unknown_backend_is_a_one_line_error_naming_the_valid_ones():
    for call in (weight_transport_for, engine_args_for):
        with pytest.raises(ValueError) as err:
            call("rdma")
        message = str(err.value)
        assert "\n" not in message and "'rdma'" in message
        assert all(b in message for b in ("shared_memory", "ipc", "nccl"))
    with pytest.raises(ValueError, match="valid: nccl"):
        NativeWeightTransport("shared_memory")
    with pytest.raises(ValueError, match="BucketedIpcTransport"):
        NativeWeightTransport("ipc")


@pytest.mark.parametrize("backend, engine_cls", [("ipc", "IPCWeightTransferEngine"),
                                                  ("nccl", "NCCLWeightTransferEngine")])
def test_engine_args_build_the_config_vllm_builds_its_worker_engine_from(backend, engine_cls,
                                                                      tmp_path):
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = engine_args_for(backend)
    assert set(kwargs) == {"weight_transfer_config"}
    config = kwargs["weight_transfer_config"]
    assert isinstance(config, WeightTransferConfig) and config.backend == backend
    assert AsyncEngineArgs(model=str(tmp_path), **kwargs).weight_transfer_config is config
    # What each worker does at model load (Worker.load_model).
    vllm_config = SimpleNamespace(parallel_config=None, model_config=None)
    engine = WeightTransferEngineFactory.create_engine(config, vllm_config, torch.device("cpu"),
                                                       torch.nn.Linear(2, 2))
    assert type(engine).__name__ == engine_cls


def test_shared_memory_needs_no_engine_args():
    assert engine_args_for("shared_memory") == {}


def test_trainer_init_info_is_vllms_own():
    llm = SimpleNamespace(vllm_config=SimpleNamespace(
        parallel_config=SimpleNamespace(world_size_across_dp=4)))
    nccl = NativeWeightTransport("nccl", master_port=29555).trainer_init_info(llm)
    assert type(nccl).__name__ == "NCCLTrainerInitInfo" and nccl.is_sender
    assert (nccl.world_size, nccl.master_port, nccl.packed) == (5, 29555, True)  # vLLM's default
    assert NativeWeightTransport("nccl", world_size=9).trainer_init_info(llm).world_size == 9


# ---- push, against a recording AsyncLLM ------------------------------------------------------------


class RecordingLLM:
    """The AsyncLLM weight-transfer methods; each checks it runs on the event loop thread."""

    def __init__(self, workers: int = 1, fail_update: bool = False) -> None:
        self.calls: list[tuple[str, object]] = []
        self.loop_thread = threading.get_ident()
        self.fail_update = fail_update
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(world_size_across_dp=workers))

    def _record(self, name: str, arg: object = None) -> None:
        assert threading.get_ident() == self.loop_thread
        self.calls.append((name, arg))

    async def shutdown_weight_transfer_engine(self) -> None:
        self._record("shutdown")

    async def init_weight_transfer_engine(self, request) -> None:
        self._record("init", request)

    async def start_weight_update(self) -> None:
        self._record("start")

    async def update_weights(self, request) -> None:
        self._record("update", request)
        if self.fail_update:
            raise RuntimeError("worker refused the update")

    async def finish_weight_update(self, weight_version=None) -> None:
        self._record("finish", weight_version)


class FakeNcclGroup:
    """Stands in for PyNcclCommunicator on the trainer side: records what is broadcast."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []
        self.destroyed = False

    def broadcast(self, tensor, src, stream=None) -> None:
        assert src == 0
        self.sent.append(tensor.clone())

    def destroy(self) -> None:
        self.destroyed = True


@pytest.fixture
def fake_nccl(monkeypatch):
    """vLLM's real NCCL engines, minus the communicator, CUDA streams and the current device."""
    import vllm.distributed.weight_transfer.nccl_engine as nccl_engine
    import vllm.distributed.weight_transfer.packed_tensor as packed_tensor

    groups: list[FakeNcclGroup] = []

    def open_endpoint(init_info):
        groups.append(FakeNcclGroup())
        return groups[-1]

    no_stream = SimpleNamespace(synchronize=lambda: None)
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_endpoint)
    monkeypatch.setattr(packed_tensor, "_get_streams", lambda device, n: (no_stream,) * n)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: no_stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    return groups


def _worker_receives(init_info: dict, update_info: dict, sent: list[torch.Tensor]) -> dict:
    """vLLM's worker-side NCCL engine (made by its factory) receiving what the trainer sent."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    loaded: dict[str, torch.Tensor] = {}
    model = SimpleNamespace(load_weights=lambda ws: loaded.update((n, t.clone()) for n, t in ws))
    engine = WeightTransferEngineFactory.create_engine(
        engine_args_for("nccl")["weight_transfer_config"],
        SimpleNamespace(parallel_config=None, model_config=None), torch.device("cpu"), model)
    parsed = engine.parse_init_info(init_info)
    assert isinstance(parsed, NCCLWeightTransferInitInfo) and parsed.rank_offset == 1
    # What init_transfer_engine records, without joining a real NCCL group.
    engine.packed = parsed.packed
    engine.packed_buffer_size_bytes = parsed.packed_buffer_size_bytes
    engine.packed_num_buffers = parsed.packed_num_buffers
    incoming = iter(sent)

    def receive(tensor, src, stream=None):
        tensor.view(-1).copy_(next(incoming).reshape(-1))

    engine.model_update_group = SimpleNamespace(broadcast=receive)
    engine.receive_weights(engine.parse_update_info(update_info))
    assert next(incoming, None) is None  # every broadcast consumed
    return loaded


@pytest.mark.parametrize("packed", [False, True])
def test_nccl_push_runs_vllms_sender_and_receiver(fake_nccl, packed):
    from vllm.distributed.weight_transfer.base import (WeightTransferInitRequest,
                                                       WeightTransferUpdateRequest)

    async def scenario():
        llm = RecordingLLM(workers=2)
        transport = NativeWeightTransport("nccl", device="cpu", packed=packed, master_port=29555,
                                          packed_buffer_size_bytes=64)
        await transport.push(llm, iter(_tensors()))
        await transport.push(llm, _tensors()[:1])  # connected once
        return llm

    llm = asyncio.run(scenario())
    assert [c for c, _ in llm.calls] == ["shutdown", "init", "start", "update", "finish",
                                         "start", "update", "finish"]
    init, update = llm.calls[1][1], llm.calls[3][1]
    assert isinstance(init, WeightTransferInitRequest) and isinstance(update, WeightTransferUpdateRequest)
    assert init.init_info["world_size"] == 3 and init.init_info["packed"] is packed
    assert llm.calls[4][1] is None  # no weight version: EngineControl labels weights itself
    sent = fake_nccl[0].sent
    first = len(sent) - 1  # the second push sent one tensor (or one chunk)
    if packed:
        assert first == 2  # 64-byte buffers: more than one chunk
    loaded = _worker_receives(init.init_info, update.update_info, sent[:first])
    expected = dict(_tensors())
    assert list(loaded) == [n for n, _ in (packing_order(_tensors()) if packed else _tensors())]
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_a_failed_nccl_push_retires_that_engine(fake_nccl):
    async def scenario():
        llm = RecordingLLM(fail_update=True)
        transport = NativeWeightTransport("nccl", device="cpu", packed=False, master_port=29555)
        with pytest.raises(RuntimeError, match="refused"):
            await transport.push(llm, _tensors())
        calls = len(llm.calls)
        with pytest.raises(WeightsUntouched, match="restart the engine"):
            await transport.push(llm, _tensors())
        assert len(llm.calls) == calls
        await transport.push(RecordingLLM(), _tensors())  # a restarted engine connects afresh

    asyncio.run(scenario())
    assert fake_nccl[0].destroyed and len(fake_nccl) == 2


def test_push_refuses_before_any_call(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")

    async def scenario():
        llm = RecordingLLM()
        with pytest.raises(WeightsUntouched, match="VLLM_ALLOW_INSECURE_SERIALIZATION=1"):
            await BucketedIpcTransport(device="cpu").push(llm, _tensors())
        for transport in (BucketedIpcTransport(device="cpu"), NativeWeightTransport("nccl", device="cpu")):
            with pytest.raises(WeightsUntouched, match="no tensors"):
                await transport.push(llm, [])
        return llm

    assert asyncio.run(scenario()).calls == []


def test_an_engine_without_weight_transfer_config_is_untouched(fake_nccl):
    class Unconfigured(RecordingLLM):
        async def init_weight_transfer_engine(self, request) -> None:
            raise RuntimeError("Weight transfer not configured.")

    async def scenario():
        llm = Unconfigured()
        transport = NativeWeightTransport("nccl", device="cpu", master_port=29555)
        with pytest.raises(WeightsUntouched, match=r"engine_args_for\('nccl'\)"):
            await transport.push(llm, _tensors())
        return llm

    assert [c for c, _ in asyncio.run(scenario()).calls] == ["shutdown"]


def test_the_client_refuses_to_block_the_event_loop():
    async def scenario():
        client = _LoopClient(RecordingLLM(), asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="deadlock"):
            client.start_weight_update()

    asyncio.run(scenario())
