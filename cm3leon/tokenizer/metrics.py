"""Reconstruction quality metrics."""
from __future__ import annotations

import torch

__all__ = ["psnr", "to_unit_float"]


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; floating images are returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if images.dtype.is_floating_point:
        return images.float()
    raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``reconstruction`` against ``reference`` (both ``[B, ...]``, uint8 or float in
    [0, 1]); peak 1.0. Identical images give +inf."""
    if reference.shape != reconstruction.shape:
        raise ValueError(f"reference and reconstruction shapes differ: {tuple(reference.shape)} vs "
                         f"{tuple(reconstruction.shape)}")
    diff = to_unit_float(reference) - to_unit_float(reconstruction)
    mse = diff.pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse)
