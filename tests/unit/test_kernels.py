"""Chunked per-token log-prob and entropy against the naive log_softmax + gather."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rollover.kernels.logprobs import chunked_logprobs, chunked_logprobs_from_logits


def _naive(logits, targets, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _inputs(tokens, hidden, vocab, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) / math.sqrt(hidden)).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    up = torch.randn(2, tokens, generator=g, dtype=dtype)  # upstream grads of both outputs
    return h, w, y, up


def _grads(outputs, upstream, inputs):
    lp, ent = outputs
    return torch.autograd.grad((lp * upstream[0] + ent * upstream[1]).sum(), inputs)


def test_hand_computed_two_token_vocab():
    # softmax(0, ln 3) = (1/4, 3/4): log-probs ln 1/4 and ln 3/4, entropy 0.562335.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    lp, ent = chunked_logprobs_from_logits(logits, torch.tensor([0, 1]), chunk_size=1)
    torch.testing.assert_close(lp, torch.tensor([math.log(0.25), math.log(0.75)]))
    torch.testing.assert_close(ent, torch.tensor([0.562335, 0.562335]))
    # uniform over 4 via hidden states: h = 0 gives zero logits, log-prob -ln 4, entropy ln 4.
    lp, ent = chunked_logprobs(torch.zeros(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 3]))
    torch.testing.assert_close(lp, torch.full((3,), -math.log(4.0)))
    torch.testing.assert_close(ent, torch.full((3,), math.log(4.0)))


@pytest.mark.parametrize(
    "tokens, hidden, vocab, chunk, temperature",
    [(37, 16, 101, 8, 1.0), (64, 32, 500, 1000, 0.7), (5, 8, 7, 1, 1.3), (130, 24, 1031, 64, 1.0)],
)
def test_linear_path_matches_naive(tokens, hidden, vocab, chunk, temperature):
    h, w, y, up = _inputs(tokens, hidden, vocab)
    out = chunked_logprobs(h, w, y, chunk_size=chunk, temperature=temperature)
    ref = _naive(h @ w.t(), y, temperature)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(out, up, (h, w)), _grads(ref, up, (h, w))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tokens, vocab, chunk, temperature", [(37, 101, 8, 1.0), (20, 300, 7, 0.6)])
def test_logits_path_matches_naive(tokens, vocab, chunk, temperature):
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(tokens, vocab, generator=g)).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    up = torch.randn(2, tokens, generator=g)
    out = chunked_logprobs_from_logits(z, y, chunk_size=chunk, temperature=temperature)
    ref = _naive(z, y, temperature)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_grads(out, up, (z,))[0], _grads(ref, up, (z,))[0], atol=1e-5, rtol=1e-4)


def test_batched_shapes_and_single_output_use():
    h, w, y, up = _inputs(24, 8, 50)
    lp, ent = chunked_logprobs(h.view(3, 8, 8), w, y.view(3, 8), chunk_size=5)
    assert lp.shape == ent.shape == (3, 8) and lp.dtype == torch.float32
    ref_lp, _ = _naive(h @ w.t(), y)
    torch.testing.assert_close(lp.reshape(-1), ref_lp, atol=1e-5, rtol=1e-5)
    # only the log-prob is used: the entropy's upstream gradient is None
    (got,) = torch.autograd.grad((lp.reshape(-1) * up[0]).sum(), h)
    (want,) = torch.autograd.grad((ref_lp * up[0]).sum(), h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_frozen_lm_head_gets_no_gradient():
    h, w, y, up = _inputs(10, 8, 40)
    w = w.detach()
    out = chunked_logprobs(h, w, y, chunk_size=3)
    (got,) = _grads(out, up, (h,))
    (want,) = _grads(_naive(h @ w.t(), y), up, (h,))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert w.grad is None


def test_bfloat16_inputs_give_float32_outputs_and_input_dtype_grads():
    h, w, y, up = _inputs(16, 16, 64, dtype=torch.bfloat16)
    out = chunked_logprobs(h, w, y, chunk_size=5)
    assert out[0].dtype == torch.float32
    gh, gw = _grads(out, up.float(), (h, w))
    assert gh.dtype == gw.dtype == torch.bfloat16
    ref = _naive(h @ w.t(), y)
    torch.testing.assert_close(out[0], ref[0], atol=1e-3, rtol=1e-3)


def test_gradcheck_float64():
    h, w, y, _ = _inputs(7, 4, 11, dtype=torch.float64)
    linear = lambda a, b: chunked_logprobs(a, b, y, chunk_size=3, temperature=0.8)  # noqa: E731
    assert torch.autograd.gradcheck(linear, (h, w))
    z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: chunked_logprobs_from_logits(a, y[:6], chunk_size=4), (z,))


def test_bad_chunk_size_raises():
    h, w, y, _ = _inputs(4, 4, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs(h, w, y, chunk_size=0)


_TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from rollover.kernels import triton_logprobs
    from rollover.kernels.logprobs import chunked_logprobs, chunked_logprobs_from_logits

    def naive(z, y, t=1.0):
        logp = torch.log_softmax(z / t, dim=-1)
        return logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    g = torch.Generator().manual_seed(0)
    # vocab 5000 > the 4096 block: the online softmax crosses blocks; 37 is not a power of two
    for tokens, hidden, vocab in [(9, 8, 5000), (13, 6, 37)]:
        h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
        w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
        y = torch.randint(0, vocab, (tokens,), generator=g)
        up = torch.randn(2, tokens, generator=g)
        out = chunked_logprobs(h, w, y, chunk_size=4, temperature=0.9, backend="triton")
        ref = naive(h @ w.t(), y, 0.9)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        got = torch.autograd.grad((out[0] * up[0] + out[1] * up[1]).sum(), (h, w))
        want = torch.autograd.grad((ref[0] * up[0] + ref[1] * up[1]).sum(), (h, w))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        z = (h @ w.t()).detach().requires_grad_()
        out = chunked_logprobs_from_logits(z, y, chunk_size=5, backend="triton")
        ref = naive(z, y)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        got = torch.autograd.grad((out[0] * up[0] + out[1] * up[1]).sum(), z)[0]
        want = torch.autograd.grad((ref[0] * up[0] + ref[1] * up[1]).sum(), z)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    print("triton ok")
    """
)


def test_triton_kernels_under_interpreter():
    """The Triton kernels, run on CPU by Triton's interpreter (a fresh process: it is read at import)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton ok" in proc.stdout


def test_auto_backend_uses_torch_on_cpu():
    from rollover.kernels import rowwise
    from rollover.kernels.logprobs import _row_ops

    assert _row_ops("auto", torch.device("cpu")) == (rowwise.row_stats, rowwise.row_grad_)
