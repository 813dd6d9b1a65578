"""Data for cm3leon: the built-in procedural "shapes" world, its SFT tasks and scorer, and real-data loaders."""

from cm3leon.data.shapes import (
    BACKGROUND,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesWorld,
    caption,
    coverage,
    images_tensor,
    render,
    to_tensor,
)

__all__ = [
    "BACKGROUND", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "Scene", "ShapeObject", "ShapesWorld",
    "caption", "coverage", "images_tensor", "render", "to_tensor",
]
