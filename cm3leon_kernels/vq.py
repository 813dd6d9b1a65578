"""Fused VQ codebook lookup: nearest code, gather, and the straight-through training form.

The nearest-code search computes distances tile by tile and keeps the running argmin, so it never builds the
``N x K`` distance matrix (memory ``O(N + K·D)``). Inputs may be float32, bfloat16 or float16. On the CPU all
arithmetic is float32; on CUDA a tensor-core GEMM picks candidates and an exact float64 re-check decides
(docs/vq.md, "CUDA").
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import (FLOAT_DTYPES, as_float, check_contiguous, check_fake_devices, check_same_device,
                      check_supported_device, check_tensor, is_finite)
from ._native import cuda_built, ops

__all__ = ["vq_nearest", "vq_embed", "vector_quantize", "VQOutput"]

_METRICS = ("l2", "cosine")
# Devices with VQ kernels: the CUDA ones exist only in CUDA builds (no silent CPU round trip).
_DEVICES = ("cpu", "cuda") if cuda_built() else ("cpu",)


def _check_codebook(codebook: torch.Tensor) -> None:
    check_tensor("codebook", codebook, dtypes=FLOAT_DTYPES, ndim=2)
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0)")
    if codebook.shape[1] == 0:
        raise ValueError("codebook vectors are empty (D = 0)")
    check_contiguous("codebook", codebook)


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry of every vector in ``z``.

    Args:
        z: ``[..., D]`` float tensor (float32 / bfloat16 / float16), contiguous.
        codebook: ``[K, D]`` tensor of the same dtype and device.
        metric: ``"l2"`` (squared euclidean) or ``"cosine"`` (for l2-normalised codebooks; codes and
            vectors are compared by angle whatever their norms).

    Returns:
        ``(indices, distance)``: int64 ``[...]`` indices of the nearest code (ties go to the lowest index,
        as ``torch.argmin``) and float32 ``[...]`` distances: ``‖z − c‖²`` for ``"l2"``, ``1 − cos(z, c)``
        for ``"cosine"`` (1 when either vector is zero).

    Raises:
        TypeError / ValueError naming the argument for wrong dtypes, shapes, devices, non-contiguous
        tensors, an empty codebook, an unknown metric, or a row of z with no finite distance (NaN/inf in z;
        codes holding NaN/inf are skipped); NotImplementedError on a
        device without a kernel (CUDA needs a CUDA build, see ``cuda_built()``).
    """
    check_tensor("z", z, dtypes=FLOAT_DTYPES, min_ndim=1)
    _check_codebook(codebook)
    if z.dtype != codebook.dtype:
        raise TypeError(f"z and codebook must share a dtype, got {z.dtype} and {codebook.dtype}")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z's last dim ({z.shape[-1]}) must equal the codebook's D ({codebook.shape[1]})")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    check_same_device(z=z, codebook=codebook)
    check_supported_device("z", z, _DEVICES)
    check_contiguous("z", z)
    indices, distance = ops.vq_nearest(z.reshape(-1, z.shape[-1]), codebook, metric)
    return indices.view(z.shape[:-1]), distance.view(z.shape[:-1])


def vq_embed(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Gathers code vectors: ``codebook[indices]`` with shape ``[..., D]``; differentiable in ``codebook``.

    Raises IndexError for indices outside ``[0, K)`` and TypeError / ValueError for bad arguments.
    """
    check_tensor("indices", indices, dtypes=(torch.int64,))
    _check_codebook(codebook)
    check_same_device(indices=indices, codebook=codebook)
    check_supported_device("codebook", codebook, _DEVICES)
    check_contiguous("indices", indices)
    out = ops.vq_embed(indices.reshape(-1), codebook)
    return out.view(*indices.shape, codebook.shape[1])


class VQOutput(NamedTuple):
    quantized: torch.Tensor  # z's shape; forward value = the chosen codes, gradient passes straight to z
    indices: torch.Tensor    # int64, z.shape[:-1]
    loss: torch.Tensor       # scalar: ‖sg(z) − e‖² + beta · ‖z − sg(e)‖² (means over elements)


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, *,
                    metric: str = "l2") -> VQOutput:
    """The VQ-VAE training form: straight-through quantisation with codebook and commitment losses.

    ``beta`` weights the *commitment* term ``mean((z − sg(e))²)``; the codebook term ``mean((sg(z) − e)²)``
    has weight 1 (unlike taming-transformers' ``legacy=True`` default, which swaps them).
    Gradients: ``quantized`` passes its gradient to ``z`` unchanged; ``loss`` reaches both ``z`` and
    ``codebook``.
    """
    beta_float = as_float("beta", beta)  # huge ints become inf here, not an overflow inside the loss arithmetic
    if not (is_finite(beta_float) and beta_float >= 0):
        raise ValueError(f"beta must be a finite non-negative number, got {beta!r}")
    beta = beta_float
    indices, _ = vq_nearest(z.detach(), codebook.detach(), metric=metric)
    codes = vq_embed(indices, codebook)
    codebook_loss = torch.mean((codes - z.detach()).float() ** 2)
    commitment_loss = torch.mean((z - codes.detach()).float() ** 2)
    # Straight-through: z - sg(z) is exactly 0 forward with gradient 1, so quantized holds the codes bit for bit
    # (z + sg(codes - z) rounds, by up to an ulp of z: 0.03 for bf16 values near 4).
    quantized = codes.detach() + (z - z.detach())
    return VQOutput(quantized, indices, codebook_loss + beta * commitment_loss)


# ---- torch.library registration: fake (meta) kernels for tracing, autograd for the gather ---------------

@torch.library.register_fake("cm3leon::vq_nearest")
def _vq_nearest_fake(z, codebook, metric="l2"):
    check_fake_devices("vq_nearest", z=z, codebook=codebook)
    n = z.shape[0]
    return z.new_empty((n,), dtype=torch.int64), z.new_empty((n,), dtype=torch.float32)


@torch.library.register_fake("cm3leon::vq_embed")
def _vq_embed_fake(indices, codebook):
    check_fake_devices("vq_embed", indices=indices, codebook=codebook)
    return codebook.new_empty((indices.shape[0], codebook.shape[1]))


def _vq_embed_setup(ctx, inputs, output):
    indices, codebook = inputs
    ctx.save_for_backward(indices)
    ctx.codebook_shape = codebook.shape


def _vq_embed_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    # The gather's adjoint is a scatter-add; torch's index_add is already a single fused pass.
    grad_codebook = grad.new_zeros(ctx.codebook_shape).index_add_(0, indices, grad)
    return None, grad_codebook


torch.library.register_autograd("cm3leon::vq_embed", _vq_embed_backward, setup_context=_vq_embed_setup)
