"""Kernels and device memory.

- `gpu_check`: a GPU machine checked without vLLM (runs as a plain script too: self-contained).
- `logprob_memory`: chunked vs naive log-prob + entropy, peak memory and time.
"""
