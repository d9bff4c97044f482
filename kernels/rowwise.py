"""Per-row log-softmax statistics and their gradient, for one chunk of logits, in plain torch.

These are the two halves the chunked autograd functions in `logprobs.py` call for every chunk;
`triton_logprobs.py` provides the same two functions as Triton kernels for CUDA tensors.
Both work in float32 and touch at most two chunk-sized buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_stats(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-prob of each row's target, entropy of each row, and the row's logsumexp.

    `logits` [C, V] float32 (not modified), `targets` [C] int64 -> three float32 [C] tensors.
    """
    lse = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = (logits - lse.unsqueeze(-1)).exp_()
    # H = lse - sum_j p_j z_j, which avoids forming log p (and 0 * -inf) at all.
    entropy = lse - (probs.mul_(logits)).sum(-1)
    return chosen - lse, entropy, lse


def row_grad_(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logprob: Tensor,
    grad_entropy: Tensor,
) -> Tensor:
    """Overwrite `logits` [C, V] with d(loss)/d(logits) and return it.

    With p = softmax(z): d logprob_y / dz_j = [j = y] - p_j and d H / dz_j = -p_j (log p_j + H),
    so dz_j = -p_j (g_lp + g_H (log p_j + H)) + [j = y] g_lp. Upstream grads are per row [C].
    """
    logp = logits.sub_(lse.unsqueeze(-1))
    probs = torch.exp(logp)
    scale = logp.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
    grad = scale.add_(grad_logprob.unsqueeze(-1)).mul_(probs).neg_()
    grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logprob.unsqueeze(-1).to(grad.dtype))
    return grad
