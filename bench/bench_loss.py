"""Fused linear + cross-entropy vs F.linear + F.cross_entropy (+ backward), the plain PyTorch way.

Main case: T 2048 tokens, D 1024, V 65536 (Chameleon's vocabulary), fp32, forward + backward (a training
step's head) and forward only (evaluation loss). The training step also in bf16 at T 1024, D 1024, V 16384
(PyTorch's bf16 matmul is slow on CPUs without bf16 instructions), beside the kernels forced to the avx512
level ("cm3leon[avx512]", the fp32 products bf16 takes below avx512_bf16) where the CPU has it. PyTorch
materialises the [T, V] logits (512 MiB here) and, for training, their gradient; the fused op keeps one
chunk of logits. Peak memory is measured per call in a fresh process (bench/memory.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_path
from memory import peak_extra_mib

import cm3leon_kernels as ck

MAIN = (2048, 1024, 65536)
BF16_CASE = (1024, 1024, 16384)


def _inputs(t: int, d: int, v: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    return hidden, weight, torch.randint(0, v, (t,), generator=g)


def _torch_loss(h, w, y):
    return F.cross_entropy(F.linear(h, w), y)


def _train_step(loss_fn, hidden, weight, targets):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def step():
        h.grad = w.grad = None
        loss_fn(h, w, targets).backward()
    return step


def _eval_step(loss_fn, hidden, weight, targets):
    def step():
        with torch.no_grad():
            return loss_fn(hidden, weight, targets)
    return step


IMPLS = {"cm3leon": ck.linear_cross_entropy, "torch-linear+cross_entropy": _torch_loss}
MODES = {"fwd+bwd": _train_step, "fwd": _eval_step}


def make_call(impl: str, mode: str, t: int, d: int, v: int):
    """The call of ``impl`` in ``mode`` on fresh inputs (the factory bench/memory.py runs in a child)."""
    return MODES[mode](IMPLS[impl], *_inputs(t, d, v))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_linear_cross_entropy(benchmark, bench_record, impl, mode):
    t, d, v = MAIN
    fn = make_call(impl, mode, t, d, v)
    fn()  # warm-up: thread pools, page faults of the parameters' gradients
    extra = peak_extra_mib("bench_loss:make_call", impl, mode, t, d, v)
    matmuls = 3 if mode == "fwd+bwd" else 1
    bench_record(benchmark, case=f"linear_cross_entropy {mode} T={t} D={d} V={v} fp32", impl=impl,
                 work=matmuls * 2 * t * d * v, unit="GFLOP/s", peak_extra_mib=extra)
    benchmark.pedantic(fn, rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["cm3leon", "cm3leon[avx512]", "torch-linear+cross_entropy"])
def test_linear_cross_entropy_bf16(benchmark, bench_record, impl):
    t, d, v = BF16_CASE
    fn = cpu_path(impl, _train_step(IMPLS[impl.split("[")[0]], *_inputs(t, d, v, torch.bfloat16)))
    fn()
    bench_record(benchmark, case=f"linear_cross_entropy fwd+bwd T={t} D={d} V={v} bf16", impl=impl,
                 work=3 * 2 * t * d * v, unit="GFLOP/s")
    benchmark.pedantic(fn, rounds=3, iterations=1)


CUDA_READY = torch.cuda.is_available() and ck.cuda_built()


def _raw_cuda_loss(h, w, y):
    """The CUDA kernel through the raw op (the Python API enables CUDA once tests/test_loss_cuda.py passes)."""
    grads = torch.is_grad_enabled() and h.requires_grad
    return torch.ops.cm3leon.linear_cross_entropy_forward(h, w, y, None, -100, 0.0, 0.0, 0.0, 2, grads)[0]


@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a CUDA build of cm3leon_kernels")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", ["cm3leon", "torch-linear+cross_entropy"])
def test_linear_cross_entropy_cuda(benchmark, bench_record, impl, mode, dtype):
    """fp32 runs the exact SIMT kernels, bf16 the tensor-core ones (docs/loss.md, "CUDA")."""
    t, d, v = 8192, 2048, 65536
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hidden, weight, targets = (x.cuda() for x in _inputs(t, d, v))
    hidden, weight = hidden.to(torch_dtype), weight.to(torch_dtype)
    loss_fn = _raw_cuda_loss if impl == "cm3leon" else _torch_loss
    step = MODES[mode](loss_fn, hidden, weight, targets)

    def fn():
        step()
        torch.cuda.synchronize()
    fn()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    extra = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
    matmuls = 3 if mode == "fwd+bwd" else 1
    bench_record(benchmark, case=f"linear_cross_entropy cuda {mode} T={t} D={d} V={v} {dtype}", impl=impl,
                 work=matmuls * 2 * t * d * v, unit="GFLOP/s", peak_extra_mib=extra)
    benchmark.pedantic(fn, rounds=3, iterations=1)
