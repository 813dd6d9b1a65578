"""Fused VQ nearest-code search vs torch.cdist+argmin, the expanded matmul form, and faiss IndexFlatL2 (k=1).

The main case is also the paper's tokenizer shape: a batch of 16 images x 1024 latents = 16384 vectors
against 8192 codes of 256 dims. The CUDA cases (skipped without a GPU) use N=65536 (64 images) beside the
same baselines on the GPU and faiss-gpu's GpuIndexFlatL2 when faiss sees a GPU. On AVX-512 machines the CPU
cases also run the kernels forced to the avx2 level ("cm3leon[avx2]"), so both paths show side by side.
"""
from __future__ import annotations

import pytest
import torch
from memory import peak_extra_mib

import cm3leon_kernels as ck
from conftest import cpu_path

try:
    import faiss
except ImportError:  # the CPU and CUDA cases still run; the faiss baselines skip
    faiss = None

CUDA_READY = torch.cuda.is_available() and ck.cuda_built()
needs_cuda = pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a CUDA build of cm3leon_kernels")


def _skip_missing_faiss(impl: str) -> None:
    if impl.startswith("faiss") and faiss is None:
        pytest.skip("faiss is not installed")


def expanded_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The usual VQ-VAE code: ||c||^2 - 2 z.c^T (||z||^2 is constant per row) then argmin: an N x K matrix."""
    return (codebook.pow(2).sum(1)[None, :] - 2 * z @ codebook.T).argmin(1)


def cdist_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, codebook).argmin(1)


def faiss_flat_l2(codebook: torch.Tensor):
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.numpy())
    return lambda z: index.search(z.numpy(), 1)


def _inputs(n: int, k: int, d: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g).to(dtype), torch.randn(k, d, generator=g).to(dtype)


def make_call(impl: str, n: int, k: int, d: int):
    """The call of ``impl`` on fresh inputs (the factory bench/memory.py runs in a child process)."""
    z, codebook = _inputs(n, k, d)
    return IMPLS[impl](z, codebook)


IMPLS = {
    "cm3leon": lambda z, c: (lambda: ck.vq_nearest(z, c)),
    "cm3leon[avx2]": lambda z, c: cpu_path("cm3leon[avx2]", lambda: ck.vq_nearest(z, c)),
    "torch-expanded-matmul": lambda z, c: (lambda: expanded_argmin(z, c)),
    "torch-cdist": lambda z, c: (lambda: cdist_argmin(z, c)),
    "faiss-IndexFlatL2": lambda z, c: (lambda search=faiss_flat_l2(c): search(z)),
}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_vq_tokenizer_shape(benchmark, bench_record, impl):
    _skip_missing_faiss(impl)
    n, k, d = 16 * 1024, 8192, 256
    z, codebook = _inputs(n, k, d)
    fn = IMPLS[impl](z, codebook)
    fn()  # warm-up (faiss/torch thread pools, page faults)
    # The forced-level call has the same memory as "cm3leon" (and its child process has no conftest).
    extra = {} if impl == "cm3leon[avx2]" else \
        {"peak_extra_mib": peak_extra_mib("bench_vq:make_call", impl, n, k, d)}
    bench_record(benchmark, case=f"vq_nearest N={n} K={k} D={d} fp32", impl=impl, work=2 * n * k * d,
                 unit="GFLOP/s", **extra)
    benchmark.pedantic(fn, rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["cm3leon", "cm3leon[avx512_bf16]", "cm3leon[avx512]", "cm3leon[avx2]",
                                  "torch-expanded-matmul-fp32", "torch.mm-bf16"])
def test_vq_bf16_inputs(benchmark, bench_record, impl):
    """bf16 latents/codebook (autocast training) at the tokenizer shape. Baselines: what a user would do
    (upcast to fp32, then the expanded form), and torch.mm of the bf16 inputs alone (z @ codebook^T, no
    argmin): the machine's bf16 GEMM rate, fast only where the CPU has bf16 dot-product instructions."""
    n, k, d = 16 * 1024, 8192, 256
    z, codebook = _inputs(n, k, d, torch.bfloat16)
    fn = {"torch-expanded-matmul-fp32": lambda: expanded_argmin(z.float(), codebook.float()),
          "torch.mm-bf16": lambda: torch.mm(z, codebook.t())}.get(impl)
    fn = fn or cpu_path(impl, lambda: ck.vq_nearest(z, codebook))
    fn()
    bench_record(benchmark, case=f"vq_nearest N={n} K={k} D={d} bf16", impl=impl, work=2 * n * k * d,
                 unit="GFLOP/s")
    benchmark.pedantic(fn, rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["cm3leon", "faiss-IndexFlatL2", "torch-expanded-matmul"])
def test_vq_peak_memory_large_n(benchmark, bench_record, impl):
    """Extra peak memory at N=65536, K=8192 (target for cm3leon: < 256 MiB; the expanded form needs 2 GiB)."""
    _skip_missing_faiss(impl)
    n, k, d = 65536, 8192, 256
    fn = make_call(impl, n, k, d)
    extra = peak_extra_mib("bench_vq:make_call", impl, n, k, d)
    bench_record(benchmark, case=f"vq_nearest N={n} K={k} D={d} fp32", impl=impl, work=2 * n * k * d,
                 unit="GFLOP/s", peak_extra_mib=extra)
    benchmark.pedantic(fn, rounds=1, iterations=1)


def test_vq_small_call_overhead(benchmark, bench_record):
    """Per-call cost of a tiny lookup (1 vector, 16 codes): the Python checks + dispatcher + launch."""
    z, codebook = _inputs(1, 16, 8)
    bench_record(benchmark, case="vq_nearest tiny call (N=1 K=16 D=8)", impl="cm3leon")
    benchmark(ck.vq_nearest, z, codebook)


# ---- CUDA ------------------------------------------------------------------------------------------------

def _synced(fn):
    """The call followed by a device sync, so the timer sees the kernels, not just their launch."""
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


def faiss_gpu_flat_l2(codebook: torch.Tensor):
    """faiss-gpu exact search, k=1, on CUDA tensors in place (faiss.contrib.torch_utils: no host copies)."""
    import faiss.contrib.torch_utils  # noqa: F401  (lets GPU indexes take torch CUDA tensors)

    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = codebook.device.index or 0
    index = faiss.GpuIndexFlatL2(resources, codebook.shape[1], config)
    index.add(codebook)
    return lambda z, keep=resources: index.search(z, 1)


CUDA_IMPLS = {
    "cm3leon": lambda z, c: (lambda: ck.vq_nearest(z, c)),
    "torch-expanded-matmul": lambda z, c: (lambda: expanded_argmin(z, c)),
    "torch-cdist": lambda z, c: (lambda: cdist_argmin(z, c)),
    "faiss-gpu-IndexFlatL2": lambda z, c: (lambda search=faiss_gpu_flat_l2(c): search(z)),
}


def _cuda_inputs(n: int, k: int, d: int, dtype: torch.dtype):
    z, codebook = _inputs(n, k, d)
    return z.to("cuda", dtype), codebook.to("cuda", dtype)


@needs_cuda
@pytest.mark.parametrize("dtype,impl", [
    (torch.float32, "cm3leon"), (torch.float32, "torch-expanded-matmul"), (torch.float32, "torch-cdist"),
    (torch.float32, "faiss-gpu-IndexFlatL2"),
    (torch.bfloat16, "cm3leon"), (torch.bfloat16, "torch-expanded-matmul"),
], ids=str)
def test_vq_cuda_large_n(benchmark, bench_record, dtype, impl):
    """64 images x 1024 latents against 8192 codes of 256 dims on the GPU (the GPU target shape)."""
    _skip_missing_faiss(impl)
    if impl.startswith("faiss") and faiss.get_num_gpus() == 0:
        pytest.skip("faiss sees no GPU (faiss-cpu installed?)")
    n, k, d = 65536, 8192, 256
    z, codebook = _cuda_inputs(n, k, d, dtype)
    fn = _synced(CUDA_IMPLS[impl](z, codebook))
    fn()  # warm-up: module load, cuBLAS handles, faiss scratch memory
    torch.cuda.reset_peak_memory_stats()  # PyTorch's allocator only: faiss's own scratch memory is not seen
    base = torch.cuda.memory_allocated()
    fn()
    extra = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    dtype_name = str(dtype).replace("torch.", "")
    bench_record(benchmark, case=f"CUDA vq_nearest N={n} K={k} D={d} {dtype_name}", impl=impl,
                 work=2 * n * k * d, unit="TFLOP/s", torch_alloc_extra_mib=extra,
                 device=torch.cuda.get_device_name())
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)


@needs_cuda
@pytest.mark.parametrize("impl", ["cm3leon", "torch-expanded-matmul"])
def test_vq_cuda_one_image(benchmark, bench_record, impl):
    """One image's 1024 latents (the codebook is split across blocks so every SM has work)."""
    n, k, d = 1024, 8192, 256
    z, codebook = _cuda_inputs(n, k, d, torch.bfloat16)
    fn = _synced(CUDA_IMPLS[impl](z, codebook))
    fn()
    bench_record(benchmark, case=f"CUDA vq_nearest N={n} K={k} D={d} bfloat16", impl=impl, work=2 * n * k * d,
                 unit="TFLOP/s")
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)
