"""Checks of vq_nearest / vector_quantize that every device runs (the CPU and CUDA tests share them)."""
from __future__ import annotations

import torch

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

from helpers import fa_rule_bound, poisoned_outputs


def check_nearest(z: torch.Tensor, codebook: torch.Tensor, metric: str, *, exact: torch.Tensor | None = None,
                  baseline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs vq_nearest on z's device (poisoned outputs) and checks the contract every device meets against the
    float64 distances of the exact (possibly 16-bit) input values, ``exact`` [N, K] (computed when not given),
    with the FlashAttention rule against ``baseline``, the same distances by plain PyTorch in fp32. Returns the
    flat indices, the flat distances (float64) and ``exact`` for device-specific checks."""
    with poisoned_outputs():
        indices, distance = ck.vq_nearest(z, codebook, metric=metric)
    assert indices.device == z.device and distance.device == z.device
    assert indices.dtype == torch.int64 and distance.dtype == torch.float32
    assert indices.shape == z.shape[:-1] == distance.shape
    flat_z = z.reshape(-1, z.shape[-1])
    if exact is None:
        exact = ref.vq_distances(flat_z.double(), codebook.double(), metric)
    if baseline is None:
        baseline = ref.vq_distances(flat_z.float(), codebook.float(), metric)
    bound = fa_rule_bound(exact, baseline, eps=1e-5)
    idx, dist = indices.reshape(-1), distance.reshape(-1).double()
    assert ((idx >= 0) & (idx < codebook.shape[0])).all()
    chosen = exact.gather(1, idx[:, None])[:, 0]
    best = exact.min(dim=1).values
    # The chosen code must be optimal up to the rounding plain PyTorch itself makes in fp32.
    assert (chosen - best).max().item() <= bound
    # Where the optimum is clear by more than that rounding, the index must be exactly torch's argmin.
    second = exact.topk(2, dim=1, largest=False).values[:, 1] if exact.shape[1] > 1 else best + 1e9
    clear = (second - best) > bound
    assert torch.equal(idx[clear], exact.argmin(dim=1)[clear])
    assert (dist - chosen).abs().max().item() <= bound
    return idx, dist, exact


def check_vector_quantize_matches_reference(device):
    """vector_quantize's outputs, loss and gradients against float64 autograd. Shared with the CUDA tests."""
    z = torch.randn(3, 7, 16, dtype=torch.float32, device=device, requires_grad=True)
    codebook = torch.randn(29, 16, device=device, requires_grad=True)
    out = ck.vector_quantize(z, codebook, beta=0.3)
    # float64 reference of the same loss, through plain autograd
    z64 = z.detach().double().requires_grad_()
    c64 = codebook.detach().double().requires_grad_()
    idx = ref.vq_nearest(z64.detach(), c64.detach())[0]
    e64 = c64[idx]
    loss64 = ((e64 - z64.detach()) ** 2).mean() + 0.3 * ((z64 - e64.detach()) ** 2).mean()
    q64 = z64 + (e64 - z64).detach()
    assert torch.equal(out.indices, idx)
    assert torch.allclose(out.quantized.double(), q64, atol=1e-6)
    assert abs(out.loss.item() - loss64.item()) <= 1e-5 * max(1.0, loss64.item())
    weights = torch.randn_like(z)
    (out.loss + (out.quantized * weights).sum()).backward()
    (loss64 + (q64 * weights.double()).sum()).backward()
    assert torch.allclose(z.grad.double(), z64.grad, atol=1e-5)
    assert torch.allclose(codebook.grad.double(), c64.grad, atol=1e-5)


def check_torch_compile_fullgraph(device="cpu"):
    """vector_quantize traces without graph breaks and matches eager, gradients included (also used by the
    CUDA tests)."""
    codebook = torch.randn(64, 16, device=device, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(z):
        out = ck.vector_quantize(z, codebook)
        return out.quantized.sum() + out.loss

    z = torch.randn(10, 16, device=device, requires_grad=True)
    loss = step(z)
    loss.backward()
    eager = ck.vector_quantize(z.detach(), codebook.detach())
    assert torch.allclose(loss.detach(), eager.quantized.sum() + eager.loss, rtol=1e-5)
    assert codebook.grad is not None
