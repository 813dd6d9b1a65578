"""Rows whose only visible key carries a large ALiBi bias: the probability is exactly 1 in the forward, and the
backward, recomputing it from the saved lse, must get exactly 1 too. Otherwise dV (then the plain sum of dO
over the queries) is off by a half-precision step where PyTorch's own error is 0, beyond FlashAttention's
bound (a multiple of PyTorch's error + 2e-4)."""
from __future__ import annotations

import pytest
import torch

from cm3leon_kernels import reference as ref
from cm3leon_kernels._native import ops

from attention_checks import leaves, random_tensor
from helpers import assert_fa_rule

ALIBI_FACTOR, GRAD_EPS = 8.0, 2e-4  # FlashAttention's bound for gradients with ALiBi


@pytest.mark.parametrize("window_left", [-1, 200], ids=["all-rows", "window"])  # 200: the top rows see nothing
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[1])
def test_single_key_rows_have_probability_one(dtype, window_left):
    torch.manual_seed(0)
    sq, heads, d = 339, 12, 64
    q = random_tensor(1, sq, heads, d, dtype=dtype)
    k, v = random_tensor(1, 1, heads, d, dtype=dtype), random_tensor(1, 1, heads, d, dtype=dtype)
    slopes = torch.rand(heads) * 0.2 + 0.1  # bias up to ~100: query 0 is 338 positions from the diagonal
    # dO on a grid of 1/8: the sums that make dV are exact in fp32 and float64 in any order, and many fall on
    # a rounding tie of the half-precision result, which any P below 1 rounds the other way.
    dout = (torch.randint(-16, 17, (1, sq, heads, d)) / 8).to(dtype)
    scale = d ** -0.5

    x = leaves(q, k, v)
    out, _ = ops.flash_attn_forward(*x, scale, False, window_left, -1, 0.0, slopes)
    out.backward(dout)
    x64 = leaves(q.double(), k.double(), v.double())
    ref.attention(*x64, scale, False, (window_left, -1), alibi_slopes=slopes)[0].backward(dout.double())
    xb = leaves(q, k, v)
    ref.attention(*xb, scale, False, (window_left, -1), alibi_slopes=slopes)[0].backward(dout)
    # dV is one rounding of an exact sum: the correctly rounded reference, bit for bit.
    assert torch.equal(x[2].grad, x64[2].grad.to(dtype)), "dv: P != 1 for a row's only key"
    for label, a, b64, bb in zip("qk", x, x64, xb):
        assert_fa_rule(a.grad, b64.grad, bb.grad, name=f"d{label}", factor=ALIBI_FACTOR, eps=GRAD_EPS)
