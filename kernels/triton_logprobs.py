"""Triton kernels for the per-row log-softmax statistics and their gradient (CUDA devices).

Drop-in replacements for `rowwise.row_stats` and `rowwise.row_grad_`: one program per row walks
the vocabulary in blocks with an online softmax, so a row's statistics take one pass over its
logits and the gradient one more, with nothing vocabulary-sized allocated besides the logits.
`logprobs.py` uses them for CUDA tensors when Triton imports, and the torch versions otherwise.
Under `TRITON_INTERPRET=1` they also run on CPU tensors (that is how the tests check them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _stats_kernel(
    logits_ptr, row_stride, targets_ptr, logprob_ptr, entropy_ptr, lse_ptr, vocab,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    run_max = float("-inf")
    run_sum = 0.0  # sum_j exp(z_j - run_max)
    run_dot = 0.0  # sum_j exp(z_j - run_max) * z_j
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < vocab
        z = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, 0))
        rescale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max)
        run_sum = run_sum * rescale + tl.sum(e, 0)
        run_dot = run_dot * rescale + tl.sum(e * tl.where(valid, z, 0.0), 0)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    target = tl.load(targets_ptr + row)
    chosen = tl.load(base + target).to(tl.float32)
    tl.store(logprob_ptr + row, chosen - lse)
    tl.store(entropy_ptr + row, lse - run_dot / run_sum)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _grad_kernel(
    logits_ptr, row_stride, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr, vocab,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_lp = tl.load(grad_lp_ptr + row)
    g_ent = tl.load(grad_ent_ptr + row)
    target = tl.load(targets_ptr + row)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < vocab
        logp = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32) - lse
        probs = tl.exp(logp)
        grad = -probs * (g_lp + g_ent * (logp + entropy))
        grad = tl.where(offs == target, grad + g_lp, grad)
        tl.store(base + offs, grad, mask=valid)


def _block(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), 4096)


def row_stats(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton version of `rowwise.row_stats`: (logprob, entropy, lse), each float32 [C]."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be [C, V], rows contiguous"
    rows, vocab = logits.shape
    out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    if rows:
        _stats_kernel[(rows,)](
            logits, logits.stride(0), targets.contiguous(), out[0], out[1], out[2], vocab,
            BLOCK=_block(vocab), num_warps=8,
        )
    return out[0], out[1], out[2]


def row_grad_(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logprob: Tensor,
    grad_entropy: Tensor,
) -> Tensor:
    """Triton version of `rowwise.row_grad_`: overwrite float32 `logits` with its gradient."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be [C, V], rows contiguous"
    assert logits.dtype == torch.float32, "the gradient is written in place in float32"
    rows, vocab = logits.shape
    if rows:
        _grad_kernel[(rows,)](
            logits, logits.stride(0), targets.contiguous(), lse.contiguous(),
            entropy.contiguous(), grad_logprob.float().contiguous(),
            grad_entropy.float().contiguous(), vocab,
            BLOCK=_block(vocab), num_warps=8,
        )
    return logits
