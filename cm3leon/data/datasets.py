"""torch Datasets over the shapes world, with the same item layout as the real-data loader."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .shapes import ShapesWorld, caption, render, to_tensor


class ShapesCaptions(Dataset):
    """Scenes ``start .. start + length - 1`` of ``world`` as ``(image uint8 [3, H, W], caption)``, the
    item layout of :class:`cm3leon.data.folder.ImageCaptionFolder`, rendered on the fly."""

    def __init__(self, world: ShapesWorld, length: int, start: int = 0) -> None:
        if length < 1 or start < 0:
            raise ValueError(f"need length >= 1 and start >= 0, got length={length}, start={start}")
        self.world, self.length, self.start = world, length, start

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        scene = self.world.scene(self.start + index)
        return to_tensor(render(scene)), caption(scene)
