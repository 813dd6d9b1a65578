"""Confidence intervals for the figures of the demo report (95%, normal approximation / Wilson)."""
from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959964


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation, sample std)."""
    n = len(values)
    if n == 0:
        raise ValueError("values must not be empty")
    mean = sum(values) / n
    if n == 1:
        return mean, math.inf
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, Z95 * math.sqrt(var / n)


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``successes / n``."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    p = successes / n
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    # the exact interval holds p; clamping keeps rounding from pushing the ends past it or out of [0, 1]
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def format_mean_ci(values: Sequence[float], digits: int = 3) -> str:
    """``"0.712 ± 0.031 (n=64)"``."""
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f} (n={len(values)})"
