"""Attention benchmarks: cm3leon's fused CPU kernels beside torch's scaled_dot_product_attention (SDPA) on the
same inputs (each in its native layout: ours (B, S, H, D), SDPA's (B, H, S, D)).

Cases and targets: causal forward fp32 and bf16 B=1 H=16 S=2048 D=64 (GFLOP/s, target >= 1.3x SDPA in fp32),
each beside the same kernels forced to the avx2 and avx512 levels ("cm3leon[avx2]", "cm3leon[avx512]": the
fp32 products that bf16 inputs take below the avx512_bf16 and amx_bf16 levels) where the CPU has them; decode
fp32 B=8 H=16 D=64 over 4096 cached tokens (GB/s of K/V read, target >= 1.5x); causal backward fp32 and bf16
(ratio, aim >= 1.0x; beside the forced levels too); the per-call overhead of a tiny decode call; and torch.mm
as the machine's fp32 and bf16 matmul peak.

CUDA cases (skipped without a GPU and a CUDA build): causal bf16 forward over 16k tokens
(batch x seqlen) with 16 heads of dim 128 beside SDPA's flash backend and, when installed, the flash-attn
package (target >= 1.3x SDPA, >= 450 TFLOP/s on H100); bf16 decode B=8 H=16 D=128 over a 4096-token cache
(GB/s of K/V read, target >= 80% of HBM bandwidth). Timed functions end with torch.cuda.synchronize().
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cm3leon_kernels as ck
from conftest import cpu_path

B, H, S, D = 1, 16, 2048, 64
CAUSAL_FLOPS = 4 * B * H * D * S * (S + 1) / 2  # q.k and p.v over the visible (lower-triangle) pairs


def _qkv(b, s, h, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, s, h, d, generator=g).to(dtype) for _ in range(3)]


def _sdpa_layout(*ts):
    return [t.transpose(1, 2).contiguous() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["cm3leon", "cm3leon[avx2]", "cm3leon[avx512]", "torch.sdpa"])
def test_forward_causal(benchmark, bench_record, impl, dtype):
    q, k, v = _qkv(B, S, H, D, dtype)
    if impl.startswith("cm3leon"):
        fn = cpu_path(impl, lambda: ck.flash_attn_func(q, k, v, causal=True))
    else:
        qs, ks, vs = _sdpa_layout(q, k, v)
        fn = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
    name = "fp32" if dtype == torch.float32 else "bf16"
    bench_record(benchmark, case=f"attn fwd causal {name} B={B} H={H} S={S} D={D}", impl=impl,
                 work=CAUSAL_FLOPS, unit="GFLOP/s")
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["cm3leon", "cm3leon[avx2]", "cm3leon[avx512]", "torch.sdpa"])
def test_backward_causal(benchmark, bench_record, impl, dtype):
    q, k, v = [t.requires_grad_() for t in _qkv(B, S, H, D, dtype)]
    if impl.startswith("cm3leon"):
        out = ck.flash_attn_func(q, k, v, causal=True)
        inputs = (q, k, v)
    else:
        inputs = [t.detach().requires_grad_() for t in _sdpa_layout(q, k, v)]
        out = F.scaled_dot_product_attention(*inputs, is_causal=True)
    dout = torch.randn_like(out)
    name = "fp32" if dtype == torch.float32 else "bf16"
    bench_record(benchmark, case=f"attn bwd causal {name} B={B} H={H} S={S} D={D}", impl=impl,
                 work=2.5 * CAUSAL_FLOPS, unit="GFLOP/s")
    benchmark.pedantic(cpu_path(impl, lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)),
                       rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["cm3leon", "torch.sdpa"])
def test_decode(benchmark, bench_record, impl, dtype):
    b, cache = 8, 4096
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 1, H, D, generator=g).to(dtype)
    kc, vc = [torch.randn(b, cache, H, D, generator=g).to(dtype) for _ in range(2)]
    if impl == "cm3leon":
        fn = lambda: ck.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cache)  # noqa: E731
    else:
        qs, ks, vs = _sdpa_layout(q, kc, vc)
        fn = lambda: F.scaled_dot_product_attention(qs, ks, vs)  # noqa: E731
    name = str(dtype).split(".")[1]
    bench_record(benchmark, case=f"attn decode {name} B={b} H={H} D={D} cache={cache}", impl=impl,
                 work=kc.numel() * kc.element_size() * 2, unit="GB/s")
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["cm3leon", "torch.sdpa"])
def test_decode_call_overhead(benchmark, bench_record, impl):
    """A decode call too small to measure anything but the per-call cost (Python checks + dispatch)."""
    q, kc, vc = torch.randn(1, 1, 1, 64), torch.randn(1, 16, 1, 64), torch.randn(1, 16, 1, 64)
    kn, vn = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    if impl == "cm3leon":
        fn = lambda: ck.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=8)  # noqa: E731
    else:
        qs, ks, vs = _sdpa_layout(q, kc[:, :9], vc[:, :9])
        fn = lambda: F.scaled_dot_product_attention(qs, ks, vs)  # noqa: E731
    bench_record(benchmark, case="attn decode call overhead B=1 H=1 D=64 cache=9", impl=impl)
    benchmark.pedantic(fn, rounds=200, iterations=20, warmup_rounds=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matmul_peak(benchmark, bench_record, dtype):
    """The machine's matmul rate (torch.mm), the yardstick for the attention GFLOP/s."""
    n = 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    name = "fp32" if dtype == torch.float32 else "bf16"
    bench_record(benchmark, case=f"{name} matmul peak (torch.mm {n}^3)", impl="torch.mm", work=2 * n ** 3,
                 unit="GFLOP/s")
    benchmark.pedantic(lambda: a @ b, rounds=5, warmup_rounds=1)


# ---- CUDA -------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and ck.cuda_built()),
                                reason="needs a CUDA GPU and a CUDA build of cm3leon_kernels")
CUDA_TOKENS, CUDA_H, CUDA_D = 16384, 16, 128


def _flash_attn_package():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def _cuda_impl(impl, ours, sdpa, package):
    """The timed function for one implementation, or a skip when its library is missing."""
    if impl == "cm3leon":
        return _synced(ours)
    if impl == "torch.sdpa.flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa()
        return _synced(run)
    if _flash_attn_package() is None:
        pytest.skip("flash-attn is not installed")
    return _synced(package)


@needs_cuda
@pytest.mark.parametrize("seqlen", [2048, 8192])
@pytest.mark.parametrize("impl", ["cm3leon", "torch.sdpa.flash", "flash-attn"])
def test_cuda_forward_causal(benchmark, bench_record, impl, seqlen):
    b = CUDA_TOKENS // seqlen
    q, k, v = [t.cuda() for t in _qkv(b, seqlen, CUDA_H, CUDA_D, torch.bfloat16)]
    qs, ks, vs = _sdpa_layout(q, k, v)
    fn = _cuda_impl(impl, lambda: ck.flash_attn_func(q, k, v, causal=True),
                    lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
                    lambda: _flash_attn_package().flash_attn_func(q, k, v, causal=True))
    flops = 4 * b * CUDA_H * CUDA_D * seqlen * (seqlen + 1) / 2
    bench_record(benchmark, case=f"cuda attn fwd causal bf16 B={b} H={CUDA_H} S={seqlen} D={CUDA_D}",
                 impl=impl, work=flops, unit="GFLOP/s")
    benchmark.pedantic(fn, rounds=20, warmup_rounds=3)


@needs_cuda
@pytest.mark.parametrize("impl", ["cm3leon", "torch.sdpa.flash", "flash-attn"])
def test_cuda_decode(benchmark, bench_record, impl):
    b, cache = 8, 4096
    q = torch.randn(b, 1, CUDA_H, CUDA_D, device="cuda", dtype=torch.bfloat16)
    kc, vc = [torch.randn(b, cache, CUDA_H, CUDA_D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    lens = torch.full((b,), cache, dtype=torch.int32, device="cuda")
    qs, ks, vs = _sdpa_layout(q, kc, vc)
    fn = _cuda_impl(impl, lambda: ck.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens),
                    lambda: F.scaled_dot_product_attention(qs, ks, vs),
                    lambda: _flash_attn_package().flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens))
    bench_record(benchmark, case=f"cuda attn decode bf16 B={b} H={CUDA_H} D={CUDA_D} cache={cache}",
                 impl=impl, work=kc.numel() * kc.element_size() * 2, unit="GB/s")
    benchmark.pedantic(fn, rounds=50, warmup_rounds=5)


@needs_cuda
@pytest.mark.parametrize("impl", ["cm3leon", "torch.sdpa.flash", "flash-attn"])
def test_cuda_backward_causal(benchmark, bench_record, impl):
    """bf16 causal backward through autograd (target: >= 1.1x SDPA's flash backward on H100)."""
    seqlen = 2048
    b = CUDA_TOKENS // seqlen
    q, k, v = [t.cuda().requires_grad_() for t in _qkv(b, seqlen, CUDA_H, CUDA_D, torch.bfloat16)]
    dout = torch.randn_like(q)
    qs, ks, vs = [t.detach().requires_grad_() for t in _sdpa_layout(q, k, v)]

    def grads(forward, inputs, grad_out):
        out = forward()
        return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

    def sdpa_forward():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    if impl == "cm3leon":
        fn = _synced(grads(lambda: ck.flash_attn_func(q, k, v, causal=True), (q, k, v), dout))
    elif impl == "torch.sdpa.flash":
        fn = _synced(grads(sdpa_forward, (qs, ks, vs), dout.transpose(1, 2).contiguous()))
    else:
        package = _flash_attn_package()
        if package is None:
            pytest.skip("flash-attn is not installed")
        fn = _synced(grads(lambda: package.flash_attn_func(q, k, v, causal=True), (q, k, v), dout))
    flops = 2.5 * 4 * b * CUDA_H * CUDA_D * seqlen * (seqlen + 1) / 2
    bench_record(benchmark, case=f"cuda attn bwd causal bf16 B={b} H={CUDA_H} S={seqlen} D={CUDA_D}",
                 impl=impl, work=flops, unit="GFLOP/s")
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2)
