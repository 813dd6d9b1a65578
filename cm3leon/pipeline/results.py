"""What the generation tasks return, and best-first re-ranking of samples by a score."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImageResult", "InfillResult", "rerank"]


@dataclass(frozen=True)
class ImageResult:
    """Images sampled for ``P`` prompts, ``N`` samples each.

    Attributes:
        images: uint8 ``[P, N, 3, H, W]``.
        tokens: int64 ``[P, N, h, w]`` codebook indices the images were decoded from.
        scores: float32 ``[P, N]`` image-text scores when re-ranked (samples then sorted best first), else None.
        strategies: ``strategies[p][n]`` is how sample ``n`` was drawn: ``"topp"`` (top-p + guidance) or
            ``"cdk"`` (contrastive decoding).
    """

    images: torch.Tensor
    tokens: torch.Tensor
    scores: torch.Tensor | None
    strategies: list[list[str]]

    @property
    def best(self) -> torch.Tensor:
        """uint8 ``[P, 3, H, W]``: each prompt's first sample (its best one when re-ranked)."""
        return self.images[:, 0]


@dataclass(frozen=True)
class InfillResult:
    """One infilled document: ``segments`` with every ``<mask>`` replaced by its span, and the ``spans``."""

    segments: list[str | torch.Tensor]
    spans: list[str]


def rerank(scores: torch.Tensor) -> torch.Tensor:
    """``scores [P, N]`` -> int64 ``[P, N]``: each row's sample indices, highest score first (ties keep the
    sampling order)."""
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a floating-point tensor [prompts, samples], got {scores!r:.80}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return torch.sort(scores, dim=1, descending=True, stable=True).indices
