"""CUDA kernels of the fused linear + cross-entropy against the CPU kernel and float64 (skip without a GPU).

The Python API refuses CUDA tensors until this file has passed on a card (docs/loss.md, "CUDA"), so these
tests call the raw ops, which carry the same autograd formula.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_fa_rule, poisoned_outputs

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ck.cuda_built()),
                                reason="needs a CUDA GPU and a CUDA build of cm3leon_kernels")
ops = torch.ops.cm3leon
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def _inputs(t, d, v, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5 * 2).to(dtype)
    targets = torch.randint(0, v, (t,), generator=gen)
    targets[torch.rand(t, generator=gen) < 0.25] = -100
    lw = torch.rand(t, generator=gen) * 2
    lw[torch.rand(t, generator=gen) < 0.2] = 0.0
    return hidden, weight, targets, lw


def _run(device, hidden, weight, targets, lw, reduction, grads, smoothing=0.1, z=1e-3, cap=3.0):
    h = hidden.to(device).requires_grad_()
    w = weight.to(device).requires_grad_()
    loss, lse, _, _ = ops.linear_cross_entropy_forward(h, w, targets.to(device), lw.to(device), -100, smoothing, z,
                                                       cap, REDUCTIONS[reduction], grads and reduction != "none")
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(device)
    gh, gw = torch.autograd.grad(loss, (h, w), up)
    return [x.cpu() for x in (loss, lse, gh, gw)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("t,d,v", [(1, 1, 1), (7, 5, 11), (33, 17, 97), (200, 64, 301), (70, 128, 5000)])
def test_cuda_matches_float64_reference(t, d, v, reduction, dtype):
    hidden, weight, targets, lw = _inputs(t, d, v, dtype)
    with poisoned_outputs():
        out = _run("cuda", hidden, weight, targets, lw, reduction, grads=True)
    kw = dict(loss_weights=lw, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=3.0, return_lse=True)

    def grads(h, w, lw_):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, lse = ref.linear_cross_entropy(h, w, targets, **(kw | {"loss_weights": lw_}))
        up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.dtype)
        return [loss, lse, *torch.autograd.grad(loss, (h, w), up)]

    exact = grads(hidden.double(), weight.double(), lw.double())
    base = grads(hidden, weight, lw)
    for name, o, e, b in zip(("loss", "lse", "grad_hidden", "grad_weight"), out, exact, base):
        assert_fa_rule(o, e, b, name=name, eps=1e-4 if dtype == torch.float32 else 1e-2)


def test_cuda_agrees_with_cpu_and_checks_data():
    hidden, weight, targets, lw = _inputs(50, 32, 700, torch.float32)
    for a, b in zip(_run("cuda", hidden, weight, targets, lw, "mean", True),
                    _run("cpu", hidden, weight, targets, lw, "mean", True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    bad = targets.clone()
    bad[3] = 700
    with pytest.raises(IndexError, match="targets"):
        _run("cuda", hidden, weight, bad, lw, "mean", True)
    nan = hidden.clone()
    nan[5, 0] = float("nan")
    with pytest.raises(ValueError, match="hidden"):
        _run("cuda", nan, weight, targets, lw, "sum", True)
    with pytest.raises(ValueError, match="loss_weights"):
        _run("cuda", hidden, weight, targets, -lw, "sum", True)
