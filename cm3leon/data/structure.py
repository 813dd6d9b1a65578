"""Structure conditions of a shapes scene: segmentation masks and edge maps (docs/recipe.md §6, structure-guided
generation), as label maps and as RGB condition images the image tokenizer can encode."""

from __future__ import annotations

import numpy as np
import torch

from .shapes import Scene, coverage

#: RGB of segmentation ids when rendered: 0 = background (white), then object ids 1, 2, 3 (greys, so a
#: condition image never looks like a coloured scene).
SEGMENT_COLOURS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (0, 0, 0), (100, 100, 100),
                                                       (180, 180, 180))


def segmentation_mask(scene: Scene) -> torch.Tensor:
    """Per-pixel object id, int64 ``[H, W]``: 0 = background, ``k`` = ``scene.objects[k - 1]``.

    A pixel belongs to an object when the object covers at least half of it (objects never overlap).
    """
    cov = coverage(scene)
    mask = np.zeros((scene.image_size, scene.image_size), dtype=np.int64)
    for k in range(cov.shape[0]):
        mask[cov[k] >= 0.5] = k + 1
    return torch.from_numpy(mask)


def render_segmentation(mask: torch.Tensor) -> torch.Tensor:
    """Segmentation ids ``[H, W]`` -> uint8 RGB ``[3, H, W]`` with :data:`SEGMENT_COLOURS`."""
    if mask.ndim != 2 or mask.dtype.is_floating_point:
        raise ValueError(f"mask must be an integer [H, W] tensor, got {mask.dtype} {tuple(mask.shape)}")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= len(SEGMENT_COLOURS)):
        raise ValueError(f"mask ids must lie in [0, {len(SEGMENT_COLOURS) - 1}]")
    table = torch.tensor(SEGMENT_COLOURS, dtype=torch.uint8)
    return table[mask.long()].permute(2, 0, 1).contiguous()


def edge_map(mask: torch.Tensor) -> torch.Tensor:
    """Object outlines, bool ``[H, W]``: pixels of an object whose 4-neighbour has another id (or lies
    outside the image), i.e. the inner boundary of each segment."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1), value=-1.0)[0, 0]
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return differs & (mask > 0)


def render_edges(edges: torch.Tensor) -> torch.Tensor:
    """Edge map ``[H, W]`` bool -> uint8 RGB ``[3, H, W]``: black lines on white."""
    if edges.ndim != 2 or edges.dtype != torch.bool:
        raise ValueError(f"edges must be a bool [H, W] tensor, got {edges.dtype} {tuple(edges.shape)}")
    img = torch.where(edges, 0, 255).to(torch.uint8)
    return img[None].expand(3, -1, -1).contiguous()
