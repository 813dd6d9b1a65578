"""Sampling benchmarks: the fused cfg_sample / contrastive_sample beside the Hugging Face-style chain.

Throughput is in GB/s of logits read (B·S·V·itemsize per call): the kernel reads every logit once, so this is
the number to hold against the machine's memory bandwidth.
"""
from __future__ import annotations

import pytest
import torch

from cm3leon_kernels import cfg_sample, contrastive_sample, reference

V = 65536


def _logits(batch: int, streams: int, vocab: int = V, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, streams, vocab, generator=g) * 3).to(dtype)


def _bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


@pytest.mark.parametrize("batch", [16, 1])
@pytest.mark.parametrize("impl", ["cm3leon", "hf_chain"])
def test_cfg_topk_topp(benchmark, bench_record, batch, impl):
    """CFG (S = 2, s = 3) + top-k 50 + top-p 0.9, fp32: the decode step of CM3Leon's sampler."""
    x = _logits(batch, 2)
    if impl == "cm3leon":
        step = iter(range(10**9))
        fn = lambda: cfg_sample(x, guidance_scale=3.0, top_k=50, top_p=0.9, seed=0, step=next(step))  # noqa: E731
    else:
        fn = lambda: reference.hf_chain_sample(x, guidance_scale=3.0, top_k=50, top_p=0.9)  # noqa: E731
    bench_record(benchmark, case=f"cfg top-k 50 top-p 0.9 B={batch} V={V} fp32", impl=impl, work=_bytes(x),
                 unit="GB/s")
    benchmark.pedantic(fn, rounds=5 if impl == "hf_chain" else 50, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["cm3leon", "hf_chain"])
def test_cfg_topp_only(benchmark, bench_record, impl):
    """CFG + top-p 0.9 alone (no top-k to prune with): the mass-selection path over the whole vocabulary."""
    x = _logits(16, 2)
    if impl == "cm3leon":
        fn = lambda: cfg_sample(x, guidance_scale=3.0, top_p=0.9, seed=0, step=0)  # noqa: E731
    else:
        fn = lambda: reference.hf_chain_sample(x, guidance_scale=3.0, top_p=0.9)  # noqa: E731
    bench_record(benchmark, case=f"cfg top-p 0.9 B=16 V={V} fp32", impl=impl, work=_bytes(x), unit="GB/s")
    benchmark.pedantic(fn, rounds=5 if impl == "hf_chain" else 50, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["cm3leon", "torch_argmax"])
def test_cfg_greedy(benchmark, bench_record, impl):
    x = _logits(16, 2, dtype=torch.bfloat16)
    if impl == "cm3leon":
        fn = lambda: cfg_sample(x, guidance_scale=3.0, temperature=0.0, seed=0, step=0)  # noqa: E731
    else:
        fn = lambda: (x[:, 0] + 3.0 * (x[:, 1] - x[:, 0])).argmax(-1)  # noqa: E731
    bench_record(benchmark, case=f"cfg greedy B=16 V={V} bf16", impl=impl, work=_bytes(x), unit="GB/s")
    benchmark.pedantic(fn, rounds=50, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["cm3leon", "torch_chain"])
def test_contrastive(benchmark, bench_record, impl):
    """CD-K (k = 1, alpha = 0.1) beside the literal PyTorch chain (log-softmaxes, head mask, softmax,
    multinomial)."""
    x = _logits(16, 2)
    expert, amateur = x[:, 1], x[:, 0]
    if impl == "cm3leon":
        fn = lambda: contrastive_sample(expert, amateur, seed=0, step=0)  # noqa: E731
    else:
        fn = lambda: torch.multinomial(reference.contrastive_probs(expert, amateur), 1)  # noqa: E731
    bench_record(benchmark, case=f"contrastive k=1 B=16 V={V} fp32", impl=impl, work=_bytes(x), unit="GB/s")
    benchmark.pedantic(fn, rounds=5 if impl != "cm3leon" else 50, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["cm3leon", "cm3leon_op_direct"])
def test_tiny_call_overhead(benchmark, bench_record, impl):
    """Per-call overhead: B = 1, V = 16. `cm3leon_op_direct` skips the Python wrapper's argument checks."""
    x = _logits(1, 2, vocab=16)
    if impl == "cm3leon":
        fn = lambda: cfg_sample(x, guidance_scale=3.0, seed=0, step=0)  # noqa: E731
    else:
        op = torch.ops.cm3leon.cfg_sample.default
        fn = lambda: op(x, [3.0], 1.0, 0, 1.0, 0.0, 0, 16, None, 0, None, 0, None)  # noqa: E731
    bench_record(benchmark, case="tiny call B=1 V=16 (overhead)", impl=impl)
    benchmark.pedantic(fn, rounds=2000, warmup_rounds=10)


# ---- CUDA (skipped without a GPU): B = 64, V = 65536 CFG beside the same chain on the GPU ------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BATCH = 64


def _gpu_bench(benchmark, fn, rounds: int = 200) -> None:
    """Times fn plus a device synchronisation (so each round is the kernel's wall time, not its launch)."""
    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=5)


def _flashinfer_cfg(x: torch.Tensor, scale: float, top_k: int, top_p: float):
    """FlashInfer's fused top-k/top-p sampler after the CFG mix in PyTorch (it has no stream mix)."""
    flashinfer = pytest.importorskip("flashinfer")
    return lambda: flashinfer.sampling.top_k_top_p_sampling_from_logits(  # noqa: E731
        (x[:, 0] + scale * (x[:, 1] - x[:, 0])).float().contiguous(), top_k, top_p)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["cm3leon", "hf_chain", "flashinfer"])
def test_cuda_cfg_topk_topp(benchmark, bench_record, impl, dtype):
    """CFG (S = 2, s = 3) + top-k 50 + top-p 0.9 on the GPU: both streams are read once by the fused kernel."""
    x = _logits(GPU_BATCH, 2, dtype=dtype).cuda()
    if impl == "cm3leon":
        step = torch.zeros((), dtype=torch.int64, device="cuda")
        fn = lambda: cfg_sample(x, guidance_scale=3.0, top_k=50, top_p=0.9, seed=0, step=step)  # noqa: E731
    elif impl == "hf_chain":
        fn = lambda: reference.hf_chain_sample(x, guidance_scale=3.0, top_k=50, top_p=0.9)  # noqa: E731
    else:
        fn = _flashinfer_cfg(x, 3.0, 50, 0.9)
    name = "fp32" if dtype == torch.float32 else "bf16"
    bench_record(benchmark, case=f"cuda cfg top-k 50 top-p 0.9 B={GPU_BATCH} V={V} {name}", impl=impl,
                 work=_bytes(x), unit="GB/s")
    _gpu_bench(benchmark, fn, rounds=50 if impl == "hf_chain" else 200)


@needs_cuda
@pytest.mark.parametrize("impl", ["cm3leon", "hf_chain"])
def test_cuda_cfg_plain(benchmark, bench_record, impl):
    """CFG + temperature only (no filters): the streaming floor of the fused kernel."""
    x = _logits(GPU_BATCH, 2).cuda()
    if impl == "cm3leon":
        fn = lambda: cfg_sample(x, guidance_scale=3.0, seed=0, step=0)  # noqa: E731
    else:
        fn = lambda: reference.hf_chain_sample(x, guidance_scale=3.0)  # noqa: E731
    bench_record(benchmark, case=f"cuda cfg no filter B={GPU_BATCH} V={V} fp32", impl=impl, work=_bytes(x),
                 unit="GB/s")
    _gpu_bench(benchmark, fn)


@needs_cuda
@pytest.mark.parametrize("impl", ["cm3leon", "torch_argmax"])
def test_cuda_cfg_greedy(benchmark, bench_record, impl):
    x = _logits(GPU_BATCH, 2, dtype=torch.bfloat16).cuda()
    if impl == "cm3leon":
        fn = lambda: cfg_sample(x, guidance_scale=3.0, temperature=0.0, seed=0, step=0)  # noqa: E731
    else:
        fn = lambda: (x[:, 0] + 3.0 * (x[:, 1] - x[:, 0])).argmax(-1)  # noqa: E731
    bench_record(benchmark, case=f"cuda cfg greedy B={GPU_BATCH} V={V} bf16", impl=impl, work=_bytes(x), unit="GB/s")
    _gpu_bench(benchmark, fn)


@needs_cuda
@pytest.mark.parametrize("impl", ["cm3leon", "torch_chain"])
def test_cuda_contrastive(benchmark, bench_record, impl):
    x = _logits(GPU_BATCH, 2).cuda()
    expert, amateur = x[:, 1], x[:, 0]
    if impl == "cm3leon":
        fn = lambda: contrastive_sample(expert, amateur, k=4, seed=0, step=0)  # noqa: E731
    else:
        fn = lambda: torch.multinomial(reference.contrastive_probs(expert, amateur, k=4), 1)  # noqa: E731
    bench_record(benchmark, case=f"cuda contrastive k=4 B={GPU_BATCH} V={V} fp32", impl=impl, work=_bytes(x),
                 unit="GB/s")
    _gpu_bench(benchmark, fn, rounds=50 if impl != "cm3leon" else 200)
