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
# Partial tiles everywhere: T and V not multiples of the tensor-core kernels' 128 x 128 tiles (several tiles
# from 129 / 257 on), D not a multiple of their 64-deep chunks, D not a multiple of 8 (element-wise loads).
@pytest.mark.parametrize("t,d,v", [(1, 1, 1), (7, 5, 11), (33, 17, 97), (200, 64, 301), (70, 128, 5000),
                                   (129, 72, 257), (300, 200, 1000), (131, 37, 390)])
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


def _misaligned(x):
    """A CUDA copy of x whose data starts 2 bytes past a 16-byte boundary (contiguous, storage offset 1)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    view = buf[1:].view(x.shape)
    view.copy_(x)
    return view


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_misaligned_rows_match_aligned(dtype):
    """Rows that are not 16-byte aligned take the element-wise loads of the tensor-core kernels: the same
    operands reach shared memory, so loss and lse are bit for bit those of the aligned run (and of a rerun);
    gradients only differ by the order of their atomic adds."""
    hidden, weight, targets, lw = _inputs(150, 64, 300, dtype)
    aligned = _run("cuda", hidden, weight, targets, lw, "sum", True)
    again = _run("cuda", hidden, weight, targets, lw, "sum", True)
    shifted = _run("cuda", _misaligned(hidden), _misaligned(weight), targets, lw, "sum", True)
    for a, b in zip(aligned[:2], again[:2]):
        assert torch.equal(a, b)
    for a, b in zip(aligned[:2], shifted[:2]):
        assert torch.equal(a, b)
    for a, b in zip(aligned[2:], shifted[2:]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_tensor_core_path_reports_nan(dtype):
    """A NaN in any token tile or vocabulary tile (here the second token tile and the last, partial vocabulary
    tile) reaches lse through the tensor-core forward's merges and is reported."""
    hidden, weight, targets, lw = _inputs(150, 40, 300, dtype)
    bad_hidden = hidden.clone()
    bad_hidden[140, 39] = float("nan")
    bad_weight = weight.clone()
    bad_weight[299, 3] = float("nan")
    for h, w in ((bad_hidden, weight), (hidden, bad_weight)):
        with pytest.raises(ValueError, match="hidden"):
            _run("cuda", h, w, targets, lw, "sum", True)
