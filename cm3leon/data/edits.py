"""Text-guided edits of shapes scenes (docs/recipe.md §6): an instruction and the scene before and after.

Edit kinds: ``recolor`` (change an object's colour to one not in the scene), ``move`` (to an empty cell),
``add`` (a new object in an empty cell, when the scene has fewer than 3 objects) and ``remove`` (when it
has at least 2, so the result is never empty). Objects are named ``the {colour} {shape}``, which is
unambiguous because colours are distinct within a scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import (
    MAX_OBJECTS,
    PALETTE,
    POSITION_PHRASE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    place,
)

EDIT_KINDS: tuple[str, ...] = ("recolor", "move", "add", "remove")


@dataclass(frozen=True)
class Edit:
    """An edit: ``kind`` (one of :data:`EDIT_KINDS`), the instruction text, and both scenes."""

    kind: str
    instruction: str
    before: Scene
    after: Scene


def with_objects(scene: Scene, objects: list[ShapeObject]) -> Scene:
    """``scene`` with ``objects`` (re-sorted into row-major cell order, as generated scenes are)."""
    return Scene(scene.image_size, tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))


def possible_kinds(scene: Scene) -> tuple[str, ...]:
    """Edit kinds that apply to ``scene``."""
    n = len(scene.objects)
    return tuple(k for k in EDIT_KINDS
                 if (k != "add" or n < MAX_OBJECTS) and (k != "remove" or n >= 2) and (k == "add" or n >= 1))


def make_edit(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> Edit:
    """Sample an edit of ``scene``; ``kind`` picks the edit kind (default: uniform over possible ones)."""
    kinds = possible_kinds(scene)
    if kind is None:
        kind = kinds[int(rng.integers(len(kinds)))]
    elif kind not in kinds:
        raise ValueError(f"kind {kind!r} does not apply to a scene with {len(scene.objects)} objects "
                         f"(possible: {kinds})")
    objects = list(scene.objects)
    used_colours = {o.colour for o in objects}
    free_colours = [c for c in PALETTE if c not in used_colours]
    free_cells = [p for p in POSITIONS if p not in {o.position for o in objects}]
    if kind == "add":
        colour = free_colours[int(rng.integers(len(free_colours)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        position = free_cells[int(rng.integers(len(free_cells)))]
        new = ShapeObject(colour, shape, position, size, place(scene.image_size, position, size, rng))
        return Edit(kind, f"add a {new.describe()} {POSITION_PHRASE[position]}", scene,
                    with_objects(scene, objects + [new]))
    i = int(rng.integers(len(objects)))
    obj = objects.pop(i)
    name = f"the {obj.colour} {obj.shape}"
    if kind == "remove":
        return Edit(kind, f"remove {name}", scene, with_objects(scene, objects))
    if kind == "recolor":
        colour = free_colours[int(rng.integers(len(free_colours)))]
        new = ShapeObject(colour, obj.shape, obj.position, obj.size, obj.box)
        return Edit(kind, f"change the color of {name} to {colour}", scene,
                    with_objects(scene, objects + [new]))
    position = free_cells[int(rng.integers(len(free_cells)))]
    new = ShapeObject(obj.colour, obj.shape, position, obj.size, place(scene.image_size, position, obj.size, rng))
    return Edit(kind, f"move {name} to the {position}", scene, with_objects(scene, objects + [new]))
