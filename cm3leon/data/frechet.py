"""Fréchet distance on the features of a small fixed network (distribution quality of generated images).

**This is not Inception FID.** The features come from :class:`FixedFeatureNet`: pooled activations of a
3-layer conv net with random weights drawn from a fixed numpy seed (PCG64, stable across platforms and
releases) plus a coarse colour histogram, so scores are comparable between runs of this library without
downloading weights, but not with published FID numbers. They separate colour, shape, blur and noise
shifts on the shapes world (see tests/test_data_scorer.py and docs/data.md).

The matrix square root is computed in float64 (torch.linalg, single-threaded) with symmetric
eigendecompositions:
``tr sqrt(S1 S2) = tr sqrt(A S2 A)`` with ``A = S1^(1/2)``, where ``A S2 A`` is symmetric positive
semi-definite, so its eigenvalues are real and small negative round-off is clipped to zero (no complex
parts as with a general ``sqrtm``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

FEATURE_SEED = 20240  # fixed: changing it changes every reported distance
_WIDTHS = (3, 32, 64, 128)
_HIST_BINS = 4  # per channel
#: Scale of the colour-histogram block relative to the conv block (the distance grows with its square).
HIST_WEIGHT = 4.0


class FixedFeatureNet(nn.Module):
    """Deterministic feature extractor: ``448`` random-conv features + ``64`` colour-histogram features.

    - Three stride-2 3x3 convs with ReLU and random (He-scaled) weights from a fixed numpy seed; the
      per-channel spatial mean and standard deviation of every layer (``2 * (32 + 64 + 128)``).
    - The square root of the image's joint RGB histogram on a 4x4x4 grid, times :data:`HIST_WEIGHT`:
      random conv features alone barely notice colour changes (e.g. swapped channels score only ~1.4x the
      same-distribution distance); the histogram makes colour shifts count.

    Inputs: uint8 ``[N, 3, H, W]`` or float in 0..1 (any H, W >= 8). Output: float32 ``[N, 512]``.
    """

    def __init__(self, seed: int = FEATURE_SEED) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(_WIDTHS):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            fan_in = cin * 9  # He init keeps activations O(1) through the ReLUs
            w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / fan_in)
            conv.weight.data = torch.from_numpy(w).float()
            conv.bias.data = torch.from_numpy(rng.uniform(-0.1, 0.1, cout)).float()
            layers += [conv, nn.ReLU()]
        self.body = nn.Sequential(*layers).requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, 512]`` (float32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            u8 = images
        else:
            u8 = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        h = u8.float() / 127.5 - 1.0
        stats = []
        for layer in self.body:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                stats += [h.mean(dim=(2, 3)), h.std(dim=(2, 3), unbiased=False)]
        q = u8.long() // (256 // _HIST_BINS)
        idx = ((q[:, 0] * _HIST_BINS + q[:, 1]) * _HIST_BINS + q[:, 2]).flatten(1)
        hist = torch.zeros(len(u8), _HIST_BINS**3).scatter_add_(1, idx, torch.ones(idx.shape))
        hist = (hist / idx.shape[1]).sqrt() * HIST_WEIGHT
        return torch.cat(stats + [hist], dim=1)


_NET: FixedFeatureNet | None = None


def features(images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """:class:`FixedFeatureNet` features of ``images`` as float64 numpy ``[N, 512]``."""
    global _NET
    if _NET is None:
        _NET = FixedFeatureNet()
    out = [_NET(images[i:i + batch_size]).double().numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def feature_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of the features of at least 2 images."""
    if len(images) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {len(images)}")
    f = features(images)
    return f.mean(axis=0), np.cov(f, rowvar=False)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run small dense linear algebra single-threaded: a 512x512 eigendecomposition takes ~0.1 s on one
    core but several seconds when a multi-threaded BLAS fights other processes for busy cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians, in float64."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"mismatched statistics: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    with _one_thread():
        a = _sqrt_psd(s1)
        m = a @ s2 @ a
        cross = torch.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(cross.clamp(min=0).sqrt().sum())
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + s1.trace() + s2.trace()) - 2.0 * tr_sqrt)


def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Fréchet distance between two image sets (``[N, 3, H, W]``, uint8 or float 0..1) on
    :class:`FixedFeatureNet` features. Not comparable with Inception FID."""
    return frechet_from_stats(*feature_stats(images_a), *feature_stats(images_b))
