"""The policy's model sharded with FSDP2: one unit per decoder layer, then the root.

Precision under FSDP2: the sharded parameters stay float32 masters (the optimizer steps them),
and FSDP's `MixedPrecisionPolicy` all-gathers them in the compute dtype (`param_dtype`) and
reduces gradients in float32. It replaces `torch.autocast` (trainer/precision.py), which the
sharded forward does not use: a float32 compute dtype is full precision with no casts at all.

Gradients are *summed* over ranks, not averaged: each rank's loss already divides by the whole
mini-batch's counts (trainer/distributed/ranks.py), and a sum asked for explicitly does not
depend on how a backend implements an average (pytorch#162338: gloo summed where FSDP asked for
an average in some set-ups).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rollover.trainer.precision import token_logprobs

if TYPE_CHECKING:  # a type only: bench/gpu/gpu_check.py shards a model on machines without the recipe's pydantic
    from rollover.trainer.policy import Policy


def mixed_precision(compute_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Compute in `compute_dtype`, reduce gradients in float32; nothing cast for float32."""
    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


class LogprobRoot(nn.Module):
    """The FSDP root: the policy's log-prob forward as one module call.

    The chunked log-prob kernel reads the LM head's weight directly instead of calling the head,
    so the forward must run inside a module whose hooks have gathered the embedding, the final
    norm and the head: this one.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        logprobs, entropy = token_logprobs(self.model, input_ids, attention_mask, temperature)
        # Fresh tensors, not views: FSDP's pre-backward hook on a view is lost by an in-place op.
        return logprobs.clone(), entropy.clone()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes transformers keeps whole (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (no _no_split_modules)")
    return layers


def shard_model(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> LogprobRoot:
    """Shard `model` in place (each decoder layer a unit, the rest in the root) and return the root.

    Every unit reshards after forward, the root too, so that between steps every parameter is
    its shard (a DTensor) and the gather for the engine finds the model in one state.
    """
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True)
    root = fully_shard(LogprobRoot(model), mesh=mesh, mp_policy=mp_policy, reshard_after_forward=True)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
    return root


@torch.no_grad()
def broadcast_from_first(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Rank 0's parameters and buffers on every rank of `group`, in place.

    Ranks load the same checkpoint, but whatever is initialised at random (a LoRA adapter's A
    matrices) differs per process; sharding keeps each rank's own slice, so the ranks would
    train a model no rank ever held.
    """
    source = dist.get_global_rank(group, 0) if group is not None else 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        dist.broadcast(tensor.data, src=source, group=group)


def data_parallel_mesh(device: torch.device, group: dist.ProcessGroup | None = None) -> DeviceMesh:
    """A 1-D mesh over `group` (None: the default group) on the device's type."""
    return DeviceMesh.from_group(group or dist.group.WORLD, device.type)


class ShardedPolicy:
    """A `Policy` whose model is sharded over a process group: what `train_on_batch` needs of a
    policy (model, tokenizer, device, log-probs, trainable parameters), with the forward through
    the FSDP root. Engine weights come from trainer/distributed/gather.py.

    The KL reference of a full fine-tune stays the policy's own unsharded frozen copy (under
    autocast); with LoRA it is the sharded model with the adapter off.
    """

    def __init__(self, policy: Policy, group: dist.ProcessGroup | None = None):
        self.policy = policy
        self.model, self.tokenizer, self.device = policy.model, policy.tokenizer, policy.device
        self.dtype, self.compute_dtype, self.lora = policy.dtype, policy.compute_dtype, policy.lora
        broadcast_from_first(policy.model, group)
        self.root = shard_model(policy.base, data_parallel_mesh(policy.device, group),
                                mixed_precision(policy.compute_dtype))

    @property
    def base(self) -> nn.Module:
        return self.policy.base

    def autocast(self) -> contextlib.AbstractContextManager:
        """Nothing: FSDP's mixed-precision policy casts (see the module docstring)."""
        return contextlib.nullcontext()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.policy.trainable_parameters()

    def token_logprobs(self, input_ids: Tensor, attention_mask: Tensor,
                       temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """As `Policy.token_logprobs`; a collective: every rank must call it as often."""
        return self.root(input_ids, attention_mask, temperature)

    def enable_reference(self) -> None:
        self.policy.enable_reference()

    @torch.no_grad()
    def reference_logprobs(self, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> Tensor:
        if self.lora:
            with self.model.disable_adapter():
                return self.root(input_ids, attention_mask, temperature)[0]
        return self.policy.reference_logprobs(input_ids, attention_mask, temperature)
