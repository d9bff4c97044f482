"""Per-token log-prob of the chosen token and entropy, without the full tokens x vocab tensors.

The naive path (`lm_head` -> float32 `log_softmax` -> `gather`) holds several tokens x vocab
float32 tensors at once (logits, log-softmax, softmax, their gradients): gigabytes at 152k
vocabulary and a few thousand tokens. Here the tokens are walked in chunks. The forward keeps
only three floats per token (log-prob, entropy, logsumexp); the backward recomputes each chunk's
logits and turns them into their gradient in place, so at most a chunk x vocab pair of buffers
is alive at any time. Gradients are exact (no approximation), for hidden states, lm_head weight
and logits alike.

Per-chunk row maths comes from `rowwise` (torch) or `triton_logprobs` (CUDA, when Triton imports).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from rollover.kernels import rowwise

Backend = Literal["auto", "torch", "triton"]
DEFAULT_CHUNK = 512


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and lower precisions, float64 for float64 (gradchecks)."""
    return torch.promote_types(dtype, torch.float32)


def _row_ops(
    backend: Backend, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[Callable, Callable]:
    """(row_stats, row_grad_) for the backend; "auto" picks Triton for float32 on CUDA when it imports."""
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or dtype != torch.float32)):
        return rowwise.row_stats, rowwise.row_grad_
    try:
        from rollover.kernels import triton_logprobs
    except ImportError:
        if backend == "triton":
            raise
        return rowwise.row_stats, rowwise.row_grad_
    return triton_logprobs.row_stats, triton_logprobs.row_grad_


def _chunks(n: int, size: int) -> range:
    if size < 1:
        raise ValueError(f"chunk_size must be positive, got {size}")
    return range(0, n, size)


def _outputs(like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Three separate [n] tensors in the compute dtype: log-prob, entropy, logsumexp."""
    dtype = _compute_dtype(like.dtype)
    return tuple(torch.empty(like.shape[0], dtype=dtype, device=like.device) for _ in range(3))


def _linear_logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """A fresh [C, V] buffer (float32, or float64 for float64 inputs) of hidden @ weight.T / T."""
    logits = torch.mm(hidden, weight.t())
    logits = logits.to(_compute_dtype(logits.dtype))
    return logits.div_(temperature) if temperature != 1.0 else logits


def _upstream(grad: Tensor | None, like: Tensor, temperature: float) -> Tensor:
    """The upstream gradient in `like`'s dtype, zeros when the output was unused, scaled by 1/T.

    The per-row gradient is linear in the upstream gradients, so the chain-rule factor 1/T
    of z = x / T is folded in here instead of in a vocabulary-sized pass.
    """
    if grad is None:
        return torch.zeros_like(like)
    return grad.to(like.dtype) / temperature


class _LinearLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], targets [N]) -> (logprob [N], entropy [N]), chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, backend):
        stats, grad_ = _row_ops(backend, hidden.device, _compute_dtype(hidden.dtype))
        logprob, entropy, lse = _outputs(hidden)
        for start in _chunks(hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _linear_logits(hidden[rows], weight, temperature)
            logprob[rows], entropy[rows], lse[rows] = stats(logits, targets[rows])
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.config = (chunk_size, temperature, grad_)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        chunk_size, temperature, grad_ = ctx.config
        g_lp = _upstream(grad_logprob, lse, temperature)
        g_ent = _upstream(grad_entropy, lse, temperature)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = hidden.new_empty(hidden.shape) if want_h else None
        grad_w = weight.new_zeros(weight.shape, dtype=lse.dtype) if want_w else None
        for start in _chunks(hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _linear_logits(hidden[rows], weight, temperature)
            gz = grad_(logits, targets[rows], lse[rows], entropy[rows], g_lp[rows], g_ent[rows])
            gz = gz.to(weight.dtype)
            if want_h:
                torch.mm(gz, weight, out=grad_h[rows])
            if want_w:
                if gz.dtype == grad_w.dtype:
                    grad_w.addmm_(gz.t(), hidden[rows])
                else:  # low-precision matmul, float32 accumulation across chunks
                    grad_w.add_(torch.mm(gz.t(), hidden[rows]))
            del logits, gz
        if want_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


class _LogitsLogprobs(torch.autograd.Function):
    """(logits [N, V], targets [N]) -> (logprob [N], entropy [N]); saves only the logits."""

    @staticmethod
    def forward(ctx, logits, targets, chunk_size, temperature, backend):
        stats, grad_ = _row_ops(backend, logits.device, _compute_dtype(logits.dtype))
        logprob, entropy, lse = _outputs(logits)
        for start in _chunks(logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z = logits[rows].to(lse.dtype)
            z = z / temperature if temperature != 1.0 else z
            logprob[rows], entropy[rows], lse[rows] = stats(z.contiguous(), targets[rows])
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.config = (chunk_size, temperature, grad_)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        chunk_size, temperature, grad_ = ctx.config
        g_lp = _upstream(grad_logprob, lse, temperature)
        g_ent = _upstream(grad_entropy, lse, temperature)
        grad = logits.new_empty(logits.shape)
        for start in _chunks(logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z = logits[rows].to(lse.dtype, copy=True)
            z = z.div_(temperature) if temperature != 1.0 else z
            grad[rows] = grad_(z, targets[rows], lse[rows], entropy[rows], g_lp[rows], g_ent[rows])
        return grad, None, None, None, None


def _flatten(rows: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """[..., D] rows and [...] targets as [N, D] and [N] int64."""
    return rows.reshape(-1, rows.shape[-1]), targets.reshape(-1).long()


def _unflatten(outputs: tuple[Tensor, Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) back in the targets' shape."""
    return outputs[0].view(targets.shape), outputs[1].view(targets.shape)


def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Log-prob of `targets` and entropy under softmax(hidden @ weight.T / temperature).

    hidden [..., H] (the final hidden states, any float dtype), weight [V, H] (the lm_head
    weight, no bias), targets [...] int64 valid token ids (put any id at padding and mask it in
    the loss). Returns (logprob [...], entropy [...]) in float32 (float64 for float64 inputs).
    The head matmul runs in autocast's dtype when autocast is on, else in the wider input dtype
    (`_matmul_operands`); the softmax statistics are always float32 or wider.
    Differentiable in hidden and weight; peak extra memory is about two chunk_size x V float32
    buffers instead of several N x V ones. `backend`: "auto" (Triton for float32 CUDA tensors
    when it imports), "torch" or "triton".
    """
    flat_h, flat_t = _flatten(hidden, targets)
    flat_h, weight = _matmul_operands(flat_h, weight)
    with torch.autocast(flat_h.device.type, enabled=False):  # the backward runs without it
        outputs = _LinearLogprobs.apply(flat_h, weight, flat_t, chunk_size, temperature, backend)
    return _unflatten(outputs, targets)


def _matmul_operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """hidden and weight cast to the one dtype the head matmul runs in, forward and backward alike.

    Under autocast (a bfloat16 compute dtype over float32 master weights) that is autocast's
    dtype, as for every other linear layer; else the wider of the two. The cast happens out
    here, recorded by autograd, because the backward recomputes each chunk's logits without
    autocast: left to autocast, the forward would use bfloat16 logits and the backward float32
    ones, and the gradient would not be that of the log-probs returned.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def chunked_logprobs_from_logits(
    logits: Tensor,
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Same as `chunked_logprobs` when the logits [..., V] already exist (e.g. a model's output).

    Avoids the naive path's N x V float32 log-softmax and softmax tensors (and their gradients);
    the logits themselves and their gradient are unavoidable here. Logits must be finite.
    """
    flat_z, flat_t = _flatten(logits, targets)
    outputs = _LogitsLogprobs.apply(flat_z, flat_t, chunk_size, temperature, backend)
    return _unflatten(outputs, targets)


def naive_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The reference path (full float32 log-softmax + gather), for benchmarks and comparisons."""
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1), entropy
