"""Measure the scorer's accuracy on ground-truth and degraded shapes images.

``python -m cm3leon.data.scorer_eval --size 32 --n 2000 --sigma 1.0 --noise 12`` prints the fraction of
scenes read back exactly (every object's colour, shape, position and size; no extra objects).
:func:`degrade` (Gaussian blur + Gaussian noise) stands in for an image tokenizer's reconstructions.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from .._cli_args import int_at_least, non_negative_float
from .metrics import attributes
from .scorer import read_scene
from .shapes import ShapesWorld


def degrade(images: torch.Tensor, sigma: float = 0.0, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float ``[N, 3, H, W]`` in 0..1 after a Gaussian blur of ``sigma`` pixels
    (replicate padding) and i.i.d. Gaussian noise of std ``noise`` (in 0..255 units, seeded)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    n, c, h, w = x.shape
    if sigma > 0:
        r = int(np.ceil(3 * sigma))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / sigma) ** 2)
        k = (k[:, None] * k[None]) / k.sum() ** 2
        padded = torch.nn.functional.pad(x.reshape(n * c, 1, h, w), (r,) * 4, mode="replicate")
        x = torch.nn.functional.conv2d(padded, k[None, None]).reshape(n, c, h, w)
    if noise > 0:
        g = torch.Generator().manual_seed(seed)
        x = x + torch.randn(x.shape, generator=g) * (noise / 255)
    return x.clamp(0, 1)


def scorer_accuracy(world: ShapesWorld, n: int, start: int = 0, sigma: float = 0.0, noise: float = 0.0,
                    batch: int = 256) -> float:
    """Fraction of scenes ``start .. start + n - 1`` whose (degraded) image the scorer reads exactly."""
    correct = 0
    for b in range(start, start + n, batch):
        m = min(batch, start + n - b)
        scenes = world.scenes(m, start=b)
        images = degrade(world.images(m, start=b), sigma, noise, seed=b)
        correct += sum(list(map(attributes, read_scene(img).objects)) == list(map(attributes, s.objects))
                       for img, s in zip(images, scenes))
    return correct / n


def main(argv: list[str] | None = None) -> None:
    """Command line: print scorer accuracy for the given world size, sample count and degradation."""
    p = argparse.ArgumentParser(prog="python -m cm3leon.data.scorer_eval", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32, help="image size in pixels")
    p.add_argument("--n", type=int_at_least(1), default=2000, help="number of scenes")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="world seed")
    p.add_argument("--sigma", type=non_negative_float, default=0.0, help="Gaussian blur sigma in pixels")
    p.add_argument("--noise", type=non_negative_float, default=0.0, help="Gaussian noise std in 0..255 units")
    args = p.parse_args(argv)
    try:  # ShapesWorld names the size it cannot draw (e.g. below 16 px)
        world = ShapesWorld(args.size, seed=args.seed)
    except ValueError as err:
        p.error(f"--size {args.size}: {err}")
    t = time.perf_counter()
    acc = scorer_accuracy(world, args.n, sigma=args.sigma, noise=args.noise)
    print(f"size={args.size} n={args.n} seed={args.seed} sigma={args.sigma} noise={args.noise}: "
          f"accuracy {acc:.4f} ({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
