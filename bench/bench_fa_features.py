"""FlashAttention-feature benchmarks: sliding-window (local) causal attention forward, cm3leon's
``window_size`` beside torch's scaled_dot_product_attention with the equivalent explicit boolean mask (what a
model without a windowed kernel runs, e.g. transformers' "sdpa" for Mistral).

Case: fp32 and bf16, B=1 H=16 S=4096 D=64, each query sees itself and the 511 keys before it
(``window_size=(511, 0)``, transformers' ``sliding_window=512``). Work is the FLOPs over the visible pairs
only (GFLOP/s), so the report's ratio is the time ratio; the kernel skips key tiles outside the window while
SDPA computes the full masked matrix (aim: well above 1x, growing with S / window).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cm3leon_kernels as ck

B, H, S, D, WINDOW = 1, 16, 4096, 64, 512
VISIBLE = sum(min(i + 1, WINDOW) for i in range(S))  # keys per query summed: the window, clipped at the start
FLOPS = 4 * B * H * D * VISIBLE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["cm3leon", "torch.sdpa+mask"])
def test_sliding_window_forward(benchmark, bench_record, impl, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3))
    if impl == "cm3leon":
        fn = lambda: ck.flash_attn_func(q, k, v, causal=True, window_size=(WINDOW - 1, 0))  # noqa: E731
    else:
        i = torch.arange(S)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - WINDOW)  # (query, key)
        qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        fn = lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)  # noqa: E731
    name = "fp32" if dtype == torch.float32 else "bf16"
    bench_record(
        benchmark,
        case=f"attn fwd sliding window {name} B={B} H={H} S={S} D={D} window={WINDOW}",
        impl=impl,
        work=FLOPS,
        unit="GFLOP/s",
    )
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


def test_sliding_window_outputs_agree():
    """The two timed implementations compute the same thing (a small instance, float64 reference)."""
    s, w = 300, 37
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, s, 2, 32, generator=g) for _ in range(3))
    i = torch.arange(s)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
    want = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    got = ck.flash_attn_func(q, k, v, causal=True, window_size=(w - 1, 0))
    torch.testing.assert_close(got.double(), want.transpose(1, 2), atol=1e-5, rtol=1e-5)
