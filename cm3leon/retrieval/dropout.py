"""Query dropout (training-time retrieval): drop a fraction of a query's text tokens or image patches.

The number dropped is ``round(fraction * n)``, capped at ``n - 1`` so a query always keeps one token; which
ones are dropped is drawn from the given ``torch.Generator`` (uniformly, without replacement), so a seeded
generator reproduces the same queries.
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["check_fraction", "drop_tokens", "num_dropped", "patch_keep_indices"]


def check_fraction(fraction: float, name: str = "fraction") -> float:
    """Validates a dropout fraction in [0, 1)."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):  # numpy floats count
        raise TypeError(f"{name} must be a number in [0, 1), got {type(fraction).__name__}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {fraction!r}")
    return float(fraction)


def num_dropped(n: int, fraction: float) -> int:
    """How many of ``n`` tokens a dropout of ``fraction`` removes: ``round(fraction * n)``, at most ``n - 1``."""
    return max(0, min(n - 1, round(fraction * n)))


def drop_tokens(ids: list[int], fraction: float, generator: torch.Generator) -> list[int]:
    """``ids`` without ``num_dropped(len(ids), fraction)`` randomly chosen positions (order kept)."""
    n_drop = num_dropped(len(ids), fraction)
    if n_drop == 0:
        return list(ids)
    dropped = set(torch.randperm(len(ids), generator=generator)[:n_drop].tolist())
    return [t for i, t in enumerate(ids) if i not in dropped]


def patch_keep_indices(n_images: int, n_patches: int, fraction: float, generator: torch.Generator
                       ) -> torch.Tensor:
    """int64 ``[n_images, K]`` sorted indices of the patches each image keeps, ``K = n_patches -
    num_dropped(n_patches, fraction)``; an independent draw per image."""
    keep = n_patches - num_dropped(n_patches, fraction)
    scores = torch.rand(n_images, n_patches, generator=generator)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values
