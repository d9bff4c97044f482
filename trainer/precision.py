"""The mixed-precision policy's pieces: compute dtype, autocast, the served casts, the forward.

`model.dtype` names the *compute* dtype. Trained parameters are float32 master weights (AdamW's
state follows them), forward passes run under `torch.autocast` to the compute dtype, and the
engine is sent casts of the masters in that dtype. A policy sharded by FSDP2
(trainer/distributed/shard.py) keeps the float32 masters but casts with FSDP's mixed-precision
policy instead of autocast. Kept free of the recipe schema so the GPU
check (bench/gpu/gpu_check.py) runs it on a machine with only torch and transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor

from rollover.kernels.logprobs import chunked_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_to(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the compute dtype, or nothing when it is float32 (full precision)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Next-token log-probs and entropies through the decoder and the chunked LM-head kernel.

    Runs in whatever precision context the caller set (`autocast_to`); the kernel casts the
    head matmul's operands to autocast's dtype itself (kernels/logprobs.py).
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = model.get_output_embeddings().weight
    return chunked_logprobs(hidden[:, :-1], head, input_ids[:, 1:], temperature=temperature)


def low_precision(parameters: Iterable[Tensor]) -> list[str]:
    """The dtypes among `parameters` that are not float32 (trained weights must be masters)."""
    return sorted({str(p.dtype) for p in parameters if p.dtype != torch.float32})


class ServedCasts:
    """Detached casts of floating tensors to the served dtype, one per source tensor: tied
    weights stay one tensor, and a tensor already in that dtype is passed as is (no copy).
    `dtype` None: no cast at all."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype, self.done = dtype, {}

    def __call__(self, tensor: Tensor) -> Tensor:
        if self.dtype is None or not tensor.is_floating_point():
            return tensor.detach()
        key = (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
        if key not in self.done:
            self.done[key] = tensor.detach().to(self.dtype)
        return self.done[key]
