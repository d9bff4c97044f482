"""rollover.kernels: per-token log-prob and entropy without a tokens x vocabulary tensor.

- `logprobs`: the chunked path over the LM head (forward and backward), picking a row backend
- `rowwise`: per-row log-softmax statistics and gradient in plain torch (any device)
- `triton_logprobs`: the same rows as Triton kernels (CUDA)
"""
