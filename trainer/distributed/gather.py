"""The engine's weights from a sharded policy, gathered unit by unit into buckets.

What `Policy.engine_weights` returns for one process (checkpoint naming, the compute dtype,
LoRA merged out of place), but as a stream of buckets, so no rank holds a second whole model.
Each FSDP unit (a decoder layer, or the root's embedding, norm and head) is all-gathered with
one collective (`FSDPModule.unshard`, which casts the float32 shards to the compute dtype
before the gather, as the forward does), its tensors are copied into the bucket, and the unit
is resharded before the next one. A tensor per collective (`DTensor.full_tensor()`) cost a
round trip per weight: ~9 per layer.

One case keeps the gather per tensor: LoRA below float32, whose merge must be computed from the
float32 base weights (`merged_lora_weight`), which the unit's gather in the compute dtype does
not have.

A collective: every rank must walk the whole stream in step (non-zero ranks drop the buckets);
rank 0 pushes them to the engines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from rollover.trainer.distributed.shard import ShardedPolicy
from rollover.trainer.policy import engine_name, merged_lora_weight

Bucket = list[tuple[str, Tensor]]
DEFAULT_BUCKET_BYTES = 256 << 20


def full(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The whole tensor from its shards (as is when not sharded), floating ones cast to `dtype`."""
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _lora_layers(model) -> dict[str, object]:
    """State-dict key of each LoRA layer's base weight -> the layer."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.base_layer.weight": module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def _merged(module, dtype: torch.dtype | None) -> Tensor:
    """A LoRA layer's weight with its active adapters merged, as `Policy.engine_weights` does."""
    merged = full(module.get_base_layer().weight, None)
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            merged = merged_lora_weight(merged, full(module.lora_A[adapter].weight, None),
                                        full(module.lora_B[adapter].weight, None), module.scaling[adapter],
                                        module.fan_in_fan_out)
    return merged.to(dtype) if dtype is not None else merged


def engine_weight_buckets(policy: ShardedPolicy, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                          cast: bool = True) -> Iterator[Bucket]:
    """(name, tensor) buckets of about `bucket_bytes` each, in state-dict order.

    `cast=False` is for a transport that casts to the compute dtype itself: a unit's gather
    already yields that dtype (the same values the cast would make, at half the traffic), and
    the per-tensor gather yields the float32 masters. Tied weights are gathered once and
    yielded under each name as the same tensor (held until their last name is yielded).
    """
    if policy.lora and policy.compute_dtype != torch.float32:
        return _buckets(policy, bucket_bytes, _TensorGather(policy.compute_dtype if cast else None))
    return _buckets(policy, bucket_bytes, _UnitGather(policy))


def _buckets(policy: ShardedPolicy, bucket_bytes: int, gather: "_TensorGather | _UnitGather") -> Iterator[Bucket]:
    state = policy.model.state_dict()
    lora = _lora_layers(policy.model) if policy.lora else {}
    uses = Counter(id(t) for t in state.values())
    shared: dict[int, Tensor] = {}
    bucket: Bucket = []
    size = 0
    try:
        for key, tensor in state.items():
            if "lora_" in key:
                continue  # merged into its base layer's weight
            if key in lora:
                value = gather.merged(key, lora[key])
            elif uses[id(tensor)] > 1 or id(tensor) in shared:
                if id(tensor) not in shared:
                    shared[id(tensor)] = gather.whole(key, tensor)
                value = shared[id(tensor)]
                uses[id(tensor)] -= 1
                if uses[id(tensor)] == 0:  # its last name: only the buckets hold it from here
                    del shared[id(tensor)]
            else:
                value = gather.whole(key, tensor)
            bucket.append((engine_name(key) if policy.lora else key, value))
            size += value.numel() * value.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
    finally:
        gather.close()
    if bucket:
        yield bucket


class _TensorGather:
    """One collective per tensor, floating shards cast to `dtype` first (None: as they are)."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype

    def whole(self, key: str, tensor: Tensor) -> Tensor:
        return full(tensor, self.dtype)

    def merged(self, key: str, layer) -> Tensor:
        return _merged(layer, self.dtype)

    def close(self) -> None:
        pass


class _UnitGather:
    """One collective per FSDP unit: the unit owning a key is unsharded when the walk reaches it
    (the previous one resharded), and its tensors are read from the modules while it is whole.
    The walk meets the units in state-dict order, the root twice (embedding first, norm and head
    last): a second gather of a small unit rather than the root held whole throughout."""

    def __init__(self, policy: ShardedPolicy):
        self.model = policy.model
        self.dtype = policy.compute_dtype  # what the units gather in (FSDP's param_dtype)
        self.owner: dict[int, FSDPModule] = {}
        for unit in policy.root.modules():
            if isinstance(unit, FSDPModule) and unit is not policy.root:
                for module in unit.modules():
                    self.owner[id(module)] = unit
        self.root = policy.root
        self.current: FSDPModule | None = None

    def _module(self, key: str) -> tuple[nn.Module, str]:
        path, _, attr = key.rpartition(".")
        module = self.model.get_submodule(path) if path else self.model
        unit = self.owner.get(id(module), self.root)
        if unit is not self.current:
            self.close()
            unit.unshard()
            self.current = unit
        return module, attr

    def _copy(self, tensor: Tensor) -> Tensor:
        """A copy that outlives the unit's reshard (which frees the gathered storage)."""
        tensor = tensor.detach()
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            return tensor.to(self.dtype)  # a buffer FSDP does not cast
        return tensor.clone()

    def whole(self, key: str, tensor: Tensor) -> Tensor:
        module, attr = self._module(key)
        return self._copy(getattr(module, attr))

    def merged(self, key: str, layer) -> Tensor:
        self._module(key)
        value = _merged(layer, self.dtype)  # float32 here: the merge is the one-process one
        if value.data_ptr() == layer.get_base_layer().weight.data_ptr():  # no adapter active
            return value.clone()
        return value

    def close(self) -> None:
        if self.current is not None:
            self.current.reshard()
            self.current = None
