"""PNG grids of generated images: one row per prompt, the picked sample framed."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

_PICK_COLOUR = (255, 0, 200)
_LABEL_HEIGHT = 14


@dataclass(frozen=True)
class GridRow:
    """One prompt: its label, its samples (uint8 ``[n, 3, H, W]``) and the index of the picked sample."""

    label: str
    images: torch.Tensor
    pick: int | None = None


def save_grid(path: str | os.PathLike, rows: Sequence[GridRow], *, scale: int = 4, pad: int = 4) -> None:
    """Writes ``rows`` as one PNG: a text label above each row, images upscaled ``scale`` times (nearest),
    a magenta frame around each row's pick."""
    if not rows:
        raise ValueError("rows must not be empty")
    _, _, h, w = rows[0].images.shape
    cell_h, cell_w = h * scale, w * scale
    n_cols = max(r.images.shape[0] for r in rows)
    width = pad + n_cols * (cell_w + pad)
    row_h = _LABEL_HEIGHT + cell_h + pad
    canvas = Image.new("RGB", (width, pad + len(rows) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        if row.images.dtype != torch.uint8 or row.images.ndim != 4 or row.images.shape[2:] != (h, w):
            raise ValueError(f"rows[{r}].images must be uint8 [n, 3, {h}, {w}], got {row.images.dtype} "
                             f"{tuple(row.images.shape)}")
        top = pad + r * row_h
        draw.text((pad, top), row.label[: width // 6], fill=(0, 0, 0))
        for c, image in enumerate(row.images):
            pixels = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
            tile = Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST)
            x, y = pad + c * (cell_w + pad), top + _LABEL_HEIGHT
            canvas.paste(tile, (x, y))
            if row.pick == c:
                draw.rectangle((x - 2, y - 2, x + cell_w + 1, y + cell_h + 1), outline=_PICK_COLOUR, width=2)
    canvas.save(path)
