"""Read a shapes-world image back into objects (colour, shape, position, size, box).

The scorer needs no learning; it inverts the renderer:

1. **Colour lines.** A rendered pixel is ``bg + t * (c - bg)`` for one palette colour ``c`` and a coverage
   ``t`` in [0, 1] (anti-aliasing and blur keep pixels on that line). ``bg`` is estimated from the image
   (the per-channel median: objects cover well under half of a scene), so a dimmed or tinted background
   from a decoder does not look like coverage. For each pixel and colour we project onto the line:
   ``t_c`` and the residual distance. A pixel is *foreground* when its best-fitting colour (smallest
   residual) has ``t >= 0.5``.
2. **Objects** are the 8-connected foreground components (objects sit in different grid cells, at least
   two pixels apart); components smaller than a fraction of the small shape's area are dropped as noise.
3. **Colour** of an object: the palette line nearest to its mean foreground pixel (averaging beats noise).
4. **Shape and size** together: the candidate whose nominal mass (fill ratio x side**2: square 1, circle
   pi/4, triangle 1/2) and side best fit the object's ``mass`` and the longer side of its thresholded box
   (:func:`classify_shape_size`). ``mass`` sums the coverage ``t`` of the object's colour over its *halo*
   (the component grown by half a grid cell, split with neighbours), measured from the mean colour of
   the pixels no halo reaches: blur moves coverage but preserves its sum, and noise averages out.
5. **Position**: the grid cell holding the box centre.

Measured on ground truth and on noisy/blurred copies: see ``docs/data.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from .shapes import (
    BACKGROUND,
    PALETTE,
    POSITIONS,
    SIZES,
    Scene,
    ShapeObject,
    position_of_point,
    side_pixels,
)

ImageLike = np.ndarray | torch.Tensor

#: Fraction of its box each shape covers.
FILL: dict[str, float] = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_NAMES = list(PALETTE)
_BG = np.asarray(BACKGROUND, dtype=np.float64)
_COLOURS = np.asarray([PALETTE[n] for n in _NAMES], dtype=np.float64)  # [C, 3]
_NEIGHBOURS8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def as_hwc_float(image: ImageLike) -> np.ndarray:
    """An RGB image -> float64 numpy ``[H, W, 3]`` in 0..255.

    Accepts uint8 (0..255) or floating (0..1, clipped) images, as ``[3, H, W]`` torch tensors (the
    library's layout) or ``[H, W, 3]`` numpy arrays (what :func:`render` returns).
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W], got shape {tuple(image.shape)}")
        arr = image.detach().cpu().permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be [H, W, 3], got shape {image.shape}")
        arr = image
    else:
        raise TypeError(f"image must be a torch.Tensor or numpy array, got {type(image).__name__}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"image must be uint8 or floating, got {arr.dtype}")
    return np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0


def colour_lines(img: np.ndarray, background: np.ndarray = _BG) -> tuple[np.ndarray, np.ndarray]:
    """Project pixels ``[..., 3]`` onto each ``background`` -> palette colour line.

    Returns ``(t, residual)``, both ``[..., C]``: the unclipped coverage along each line and the distance
    to the nearest point of the segment (``t`` clipped to [0, 1]).
    """
    dirs = _COLOURS - background
    rel = img[..., None, :] - background  # [..., C, 3]
    t = (rel * dirs).sum(-1) / (dirs**2).sum(-1)
    nearest = np.clip(t, 0.0, 1.0)[..., None] * dirs
    return t, np.sqrt(((rel - nearest) ** 2).sum(-1))


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a bool mask (0 = background, labels not consecutive)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:  # propagate the max label until stable; iterations ~ component diameter
        padded = np.pad(labels, 1)
        best = labels.copy()
        for dy, dx in _NEIGHBOURS8:
            np.maximum(best, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=best)
        best = np.where(mask, best, 0)
        if np.array_equal(best, labels):
            return labels
        labels = best


def _grow(labels: np.ndarray, steps: int) -> np.ndarray:
    """Grow labelled regions into unlabelled (0) pixels by ``steps`` 8-neighbour steps; where two regions
    meet, the first to arrive keeps the pixel (ties: the larger label), i.e. an approximate Voronoi split."""
    h, w = labels.shape
    grown = labels.copy()
    for _ in range(steps):
        padded = np.pad(grown, 1)
        reach = np.zeros_like(grown)
        for dy, dx in _NEIGHBOURS8:
            np.maximum(reach, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=reach)
        grown = np.where(grown == 0, reach, grown)
    return grown


def classify_colour(rgb: np.ndarray, background: np.ndarray = _BG) -> str:
    """Palette name whose background->colour line passes nearest to ``rgb`` (float, 0..255)."""
    _, residual = colour_lines(np.asarray(rgb, dtype=np.float64), background)
    return _NAMES[int(np.argmin(residual))]


def classify_shape_size(mass: float, extent: int, image_size: int) -> tuple[str, str]:
    """(shape, size) whose nominal mass ``FILL[shape] * side**2`` and side best explain an object.

    ``mass`` is the summed coverage (preserved by blur), ``extent`` the thresholded box's longer side.
    The cost adds both squared relative errors; an extent *below* the nominal side costs a quarter as
    much, because blur shrinks thresholded boxes at corners and apexes (a blurred large triangle would
    otherwise pass for a small square), while nothing makes them grow.
    """
    best, best_cost = ("", ""), float("inf")
    for size_name in SIZES:
        side = side_pixels(image_size, size_name)
        for shape, fill in FILL.items():
            nominal = fill * side**2
            rel = (extent - side) / side
            cost = ((mass - nominal) / nominal) ** 2 + (rel**2 if rel > 0 else rel**2 / 4)
            if cost < best_cost:
                best, best_cost = (shape, size_name), cost
    return best


def read_scene(image: ImageLike, min_area_fraction: float = 0.3) -> Scene:
    """Detect the objects of a (generated, decoded or rendered) shapes image.

    Args:
        image: see :func:`as_hwc_float`; must be square (the world's images are).
        min_area_fraction: components with fewer foreground pixels than this fraction of a small
            triangle's area are ignored as noise.

    Returns:
        A :class:`Scene` whose objects are sorted by grid cell (as generated scenes are); boxes are the
        half-open bounding boxes of the foreground pixels.
    """
    img = as_hwc_float(image)
    size = img.shape[0]
    if img.shape[1] != size:
        raise ValueError(f"image must be square, got {img.shape[0]}x{img.shape[1]}")
    background = np.median(img.reshape(-1, 3), axis=0)  # objects cover well under half of any scene
    t, residual = colour_lines(img, background)
    best = np.argmin(residual, axis=-1)
    strength = np.take_along_axis(t, best[..., None], axis=-1)[..., 0]
    foreground = strength >= 0.5
    labels = _components(foreground)
    min_area = min_area_fraction * FILL["triangle"] * side_pixels(size, SIZES[0]) ** 2
    ids, counts = np.unique(labels, return_counts=True)
    labels[np.isin(labels, ids[(ids == 0) | (counts < min_area)])] = 0
    # every object's blur halo, split between neighbours. Pixels no halo reaches give the background
    # colour for the coverage sums: their mean, not the median, so that noise clipped at white biases
    # background pixels inside the halos by as much as outside (to first order).
    halos = _grow(labels, max(3, round(size / 6)))  # about half a grid cell
    far = halos == 0
    if far.any():
        background = img[far].mean(axis=0)
        t, _ = colour_lines(img, background)
    t = np.clip(t, -0.5, 1.5)
    objects = []
    for i in np.unique(labels[labels > 0]):
        comp = labels == i
        colour = classify_colour(img[comp].mean(axis=0), background)
        mass = float(t[..., _NAMES.index(colour)][halos == i].sum())
        ys, xs = np.nonzero(comp)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        extent = max(box[2] - box[0], box[3] - box[1])
        shape, size_name = classify_shape_size(mass, extent, size)
        position = position_of_point(size, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        objects.append(ShapeObject(colour, shape, position, size_name, box))
    objects.sort(key=lambda o: (POSITIONS.index(o.position), o.box))
    return Scene(size, tuple(objects))


def read_scenes(images: torch.Tensor) -> list[Scene]:
    """:func:`read_scene` over a batch ``[N, 3, H, W]`` (uint8, or float in 0..1)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    return [read_scene(img) for img in images]
