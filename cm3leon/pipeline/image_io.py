"""PNG in and out for the command line: strict image reading and sample grids."""
from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["make_grid", "read_image", "write_png"]


def read_image(path: str | os.PathLike, size: int, *, name: str = "image") -> torch.Tensor:
    """An RGB image file of exactly ``size`` x ``size`` pixels -> uint8 ``[3, size, size]``.

    Nothing is converted or resized silently: another mode (grayscale, RGBA, palette) or size is a ValueError
    naming ``name`` and the file (convert or resize the image first, e.g. with Pillow).
    """
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            if mode != "RGB":
                raise ValueError(f"{name} {str(path)!r} has mode {mode}; expected an RGB image")
            if (w, h) != (size, size):
                raise ValueError(f"{name} {str(path)!r} is {w}x{h} pixels; this model reads {size}x{size} images")
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read {name} {str(path)!r}: {err}") from err
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def make_grid(images: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """uint8 ``[rows, cols, 3, H, W]`` -> one uint8 ``[3, H', W']`` image, white ``padding`` pixels between."""
    if images.ndim != 5 or images.dtype != torch.uint8 or images.shape[2] != 3:
        raise ValueError(f"images must be uint8 [rows, cols, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    rows, cols, _, h, w = images.shape
    grid = torch.full((3, rows * (h + padding) + padding, cols * (w + padding) + padding), 255, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = padding + r * (h + padding), padding + c * (w + padding)
            grid[:, top:top + h, left:left + w] = images[r, c]
    return grid


def write_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Writes a uint8 ``[3, H, W]`` image as PNG."""
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")
