"""Fréchet distance on the features of a small fixed network (distribution quality of generated images).

**This is not Inception FID.** The features come from :class:`FixedFeatureNet`: a 3-layer conv net with
random weights drawn from a fixed numpy seed (PCG64, stable across platforms and releases), so scores are
comparable between runs of this library without downloading weights, but not with published FID numbers.
Random conv features still separate colour, shape and texture statistics well enough to rank models and
catch distribution shift on the shapes world (see tests/test_data_scorer.py).

The matrix square root is computed in float64 with symmetric eigendecompositions:
``tr sqrt(S1 S2) = tr sqrt(A S2 A)`` with ``A = S1^(1/2)``, where ``A S2 A`` is symmetric positive
semi-definite, so its eigenvalues are real and small negative round-off is clipped to zero (no complex
parts as with a general ``sqrtm``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FEATURE_SEED = 20240  # fixed: changing it changes every reported distance
_WIDTHS = (3, 32, 64, 128)


class FixedFeatureNet(nn.Module):
    """Deterministic random-init conv net: three stride-2 3x3 convs with ReLU, then per-channel mean and
    standard deviation over space -> ``2 * 128`` features. Inputs: uint8 ``[N, 3, H, W]`` or float in
    0..1 (any H, W >= 8)."""

    def __init__(self, seed: int = FEATURE_SEED) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        layers: list[nn.Module] = []
        for cin, cout in zip(_WIDTHS[:-1], _WIDTHS[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            fan_in = cin * 9  # He init keeps activations O(1) through the ReLUs
            w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / fan_in)
            conv.weight.data = torch.from_numpy(w).float()
            conv.bias.data = torch.from_numpy(rng.uniform(-0.1, 0.1, cout)).float()
            layers += [conv, nn.ReLU()]
        self.body = nn.Sequential(*layers).requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, 256]`` (float32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        h = self.body(x * 2.0 - 1.0)
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3), unbiased=False)], dim=1)


_NET: FixedFeatureNet | None = None


def features(images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """:class:`FixedFeatureNet` features of ``images`` as float64 numpy ``[N, 256]``."""
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


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians, in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    a = _sqrt_psd(s1)
    cross = np.linalg.eigvalsh((a @ s2 @ a + (a @ s2 @ a).T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt))


def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Fréchet distance between two image sets (``[N, 3, H, W]``, uint8 or float 0..1) on
    :class:`FixedFeatureNet` features. Not comparable with Inception FID."""
    return frechet_from_stats(*feature_stats(images_a), *feature_stats(images_b))
