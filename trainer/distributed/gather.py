"""The engine's weights from a sharded policy, gathered bucket by bucket.

What `Policy.engine_weights` returns for one process (checkpoint naming, the compute dtype,
LoRA merged out of place), but as a stream of buckets: each parameter is all-gathered from its
shards (`DTensor.full_tensor()`) only when its bucket is built, so no rank holds a second whole
model. Floating shards are cast to the compute dtype *before* the gather (half the traffic in
bfloat16; the cast is elementwise, so the result is the same).

A collective: every rank must walk the whole stream in step (non-zero ranks drop the buckets);
rank 0 pushes them to the engines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch import Tensor
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

    `cast=False` yields the float32 masters. Tied weights are gathered once and yielded under
    each name as the same tensor (held until their last name is yielded).
    """
    dtype = policy.compute_dtype if cast else None
    state = policy.model.state_dict()
    lora = _lora_layers(policy.model) if policy.lora else {}
    uses = Counter(id(t) for t in state.values())
    shared: dict[int, Tensor] = {}
    bucket: Bucket = []
    size = 0
    for key, tensor in state.items():
        if "lora_" in key:
            continue  # merged into its base layer's weight
        if key in lora:
            value = _merged(lora[key], dtype)
        elif uses[id(tensor)] > 1 or id(tensor) in shared:
            if id(tensor) not in shared:
                shared[id(tensor)] = full(tensor, dtype)
            value = shared[id(tensor)]
            uses[id(tensor)] -= 1
            if uses[id(tensor)] == 0:  # its last name: only the buckets hold it from here
                del shared[id(tensor)]
        else:
            value = full(tensor, dtype)
        bucket.append((engine_name(key) if policy.lora else key, value))
        size += value.numel() * value.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
