"""A non-neural cross-modal baseline for the shapes evaluation: bag-of-words captions and spatial colour
histograms of images, linked by a ridge regression from image features to word counts fitted on training
pairs; both sides are compared by cosine in word space."""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["BagOfWordsColourBaseline"]

_BINS = 4      # per RGB channel
_GRID = 3      # 3x3 cells, the shapes world's positions
_WHITE = 240   # pixels brighter than this in every channel are background


def colour_histograms(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float ``[N, 9 * 64]``: per 3x3 cell, the fraction of its pixels in each of
    4x4x4 RGB bins, background (near-white) pixels left out."""
    n, _, h, w = images.shape
    x = images.long()
    bins = (x[:, 0] * _BINS // 256) * _BINS * _BINS + (x[:, 1] * _BINS // 256) * _BINS + x[:, 2] * _BINS // 256
    foreground = ~(x > _WHITE).all(dim=1)
    rows = torch.arange(h) * _GRID // h
    cols = torch.arange(w) * _GRID // w
    cell = (rows[:, None] * _GRID + cols[None, :]).expand(n, h, w)
    slot = cell * _BINS ** 3 + bins
    hist = torch.zeros(n, _GRID * _GRID * _BINS ** 3)
    hist.scatter_add_(1, slot.reshape(n, -1), foreground.reshape(n, -1).float())
    return hist / (h * w / _GRID ** 2)


class BagOfWordsColourBaseline:
    """Fit on training ``(images, captions)``; then embed held-out images and captions into word space."""

    def __init__(self, images: torch.Tensor, captions: Sequence[str], ridge: float = 1.0) -> None:
        self.words = sorted({w for c in captions for w in self._tokens(c)})
        self.index = {w: i for i, w in enumerate(self.words)}
        x = colour_histograms(images).double()
        y = self._counts(captions).double()
        self.mean_x, self.mean_y = x.mean(0), y.mean(0)
        xc, yc = x - self.mean_x, y - self.mean_y
        # ridge regression: W = (XᵀX + λI)⁻¹ XᵀY
        gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=torch.float64)
        self.weight = torch.linalg.solve(gram, xc.T @ yc)

    @staticmethod
    def _tokens(caption: str) -> list[str]:
        return re.findall(r"[a-z]+", caption.lower())

    def _counts(self, captions: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), len(self.words))
        for i, c in enumerate(captions):
            for w in self._tokens(c):
                if w in self.index:
                    out[i, self.index[w]] += 1
        return out

    def embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        return F.normalize(self._counts(captions).double() - self.mean_y, dim=-1).float()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize((colour_histograms(images).double() - self.mean_x) @ self.weight, dim=-1).float()
