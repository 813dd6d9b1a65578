"""The built-in "shapes" world: a deterministic, seedable generator of small RGB scenes.

A scene holds 1-3 objects on a white background. Each object has a colour from :data:`PALETTE` (distinct
within a scene), a shape from :data:`SHAPES`, a named cell of a 3x3 grid (:data:`POSITIONS`, one object per
cell, so objects never overlap) and a size (``"small"`` / ``"large"``). Everything is reproducible from
``(seed, index)``::

    world = ShapesWorld(image_size=32, seed=0)
    scene = world.scene(7)                 # same Scene for the same (seed, 7), on any machine
    img = render(scene)                    # uint8 numpy [H, W, 3]
    batch = world.images(16, start=0)      # torch.uint8 [16, 3, H, W], scenes 0..15
    text = caption(scene)                  # "a large red circle in the top left and a small ..."

Geometry: a shape of side ``s`` pixels sits in an integer box ``(x0, y0, x1, y1)`` (half-open,
``x1 = x0 + s``); squares fill it, circles are inscribed, triangles point up (apex at the top centre, base
along the bottom edge). Edges are anti-aliased by supersampling, so pixel colours blend linearly between
the background and the object colour (the scorer relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import check_int

#: Named object colours (RGB, uint8). Chosen far apart from each other and from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 50, 180),
    "cyan": (0, 180, 200),
}
#: Background colour (RGB, uint8).
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
#: Shape names.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Size names, smallest first.
SIZES: tuple[str, ...] = ("small", "large")
#: Side of a shape as a fraction of a grid cell's nominal width, per size name.
SIZE_FRACTION: dict[str, float] = {"small": 0.45, "large": 0.75}
#: Cell names of the 3x3 grid, row-major (row 0 = top).
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
#: How each position is phrased in captions ("a red circle in the top left").
POSITION_PHRASE: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
MAX_OBJECTS = 3
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        colour: key of :data:`PALETTE`.
        shape: one of :data:`SHAPES`.
        position: one of :data:`POSITIONS` (the 3x3 cell holding the box centre).
        size: one of :data:`SIZES`.
        box: ``(x0, y0, x1, y1)`` pixel box, half-open (``x1 - x0`` = side in pixels).
    """

    colour: str
    shape: str
    position: str
    size: str
    box: tuple[int, int, int, int]

    def describe(self) -> str:
        """Noun phrase without position, e.g. ``"large red circle"``."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: image size and its objects (row-major order of their cells)."""

    image_size: int
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)


def cell_bounds(image_size: int, cell: int) -> tuple[int, int, int, int]:
    """Pixel bounds ``(x0, y0, x1, y1)`` (half-open) of grid cell ``cell`` (0..8, row-major)."""
    row, col = divmod(cell, 3)
    edges = [round(i * image_size / 3) for i in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def side_pixels(image_size: int, size: str) -> int:
    """Side in pixels of a shape of size name ``size`` in an image of ``image_size`` pixels."""
    return max(3, round(SIZE_FRACTION[size] * image_size / 3))


def position_of_point(image_size: int, x: float, y: float) -> str:
    """Name of the 3x3 cell containing pixel coordinate ``(x, y)`` (continuous, 0..image_size)."""
    col = min(2, max(0, int(3 * x / image_size)))
    row = min(2, max(0, int(3 * y / image_size)))
    return POSITIONS[3 * row + col]


def place(image_size: int, position: str, size: str, rng: np.random.Generator | None = None,
          margin: int = 1) -> tuple[int, int, int, int]:
    """Box for a shape of ``size`` inside cell ``position``, keeping ``margin`` pixels from the cell edges.

    With ``rng`` the box is jittered uniformly within the allowed slack; without it, it is centred.
    The margin keeps a gap of at least ``2 * margin`` pixels between objects in neighbouring cells.
    """
    s = side_pixels(image_size, size)
    cx0, cy0, cx1, cy1 = cell_bounds(image_size, POSITIONS.index(position))
    lo_x, hi_x = cx0 + margin, cx1 - margin - s
    lo_y, hi_y = cy0 + margin, cy1 - margin - s
    if hi_x < lo_x or hi_y < lo_y:  # image too small for the margin: centre in the cell
        lo_x = hi_x = cx0 + (cx1 - cx0 - s) // 2
        lo_y = hi_y = cy0 + (cy1 - cy0 - s) // 2
    if rng is None:
        x0, y0 = (lo_x + hi_x) // 2, (lo_y + hi_y) // 2
    else:
        x0, y0 = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
    return x0, y0, x0 + s, y0 + s


class ShapesWorld:
    """Deterministic generator of shapes scenes.

    Args:
        image_size: side of the square images in pixels (>= 16, so that small and large shapes differ;
            32 for the demo, 64 also works well).
        seed: world seed. Scene ``index`` of a world depends only on ``(seed, index)``.
        min_objects / max_objects: object count range (inclusive, 1..3).
    """

    def __init__(self, image_size: int = 32, seed: int = 0, min_objects: int = 1,
                 max_objects: int = MAX_OBJECTS) -> None:
        check_int("image_size", image_size, 16)
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                             f"got min_objects={min_objects}, max_objects={max_objects}")
        self.image_size = image_size
        # numpy's seeding refuses negative keys only when the first scene is drawn, without naming seed
        self.seed = check_int("seed", seed, 0)
        self.min_objects = min_objects
        self.max_objects = max_objects

    def rng(self, index: int) -> np.random.Generator:
        """The random generator of scene ``index`` (keyed by ``(seed, index)``)."""
        return np.random.default_rng([self.seed, check_int("index", index, 0)])

    def sample_scene(self, rng_or_index: np.random.Generator | int) -> Scene:
        """Sample a scene from a numpy Generator, or deterministically from an integer scene index."""
        rng = self.rng(rng_or_index) if isinstance(rng_or_index, (int, np.integer)) else rng_or_index
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        cells = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
        colours = rng.choice(len(PALETTE), size=n, replace=False).tolist()
        names = list(PALETTE)
        objects = []
        for cell, colour in zip(cells, colours):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            size = SIZES[int(rng.integers(len(SIZES)))]
            position = POSITIONS[cell]
            box = place(self.image_size, position, size, rng)
            objects.append(ShapeObject(names[colour], shape, position, size, box))
        return Scene(self.image_size, tuple(objects))

    def scene(self, index: int) -> Scene:
        """Scene number ``index`` of this world (same as ``sample_scene(index)``)."""
        # int() would truncate 2.7 to scene 2 (and take True as scene 1) without a word
        return self.sample_scene(check_int("index", index, 0))

    def scenes(self, n: int, start: int = 0) -> list[Scene]:
        """Scenes ``start .. start + n - 1``."""
        return [self.scene(i) for i in range(start, start + n)]

    def images(self, n: int, start: int = 0) -> torch.Tensor:
        """Rendered scenes ``start .. start + n - 1`` as ``torch.uint8 [n, 3, H, W]`` (n may be 0)."""
        if check_int("n", n, 0) == 0:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return images_tensor(self.scenes(n, start))


def _shape_inside(shape: str, x: np.ndarray, y: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean mask of sample points ``(x, y)`` (pixel coordinates) inside ``shape`` drawn in ``box``."""
    x0, y0, x1, y1 = box
    s = x1 - x0
    if shape == "square":
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if shape == "circle":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return (x - cx) ** 2 + (y - cy) ** 2 <= (s / 2) ** 2
    if shape == "triangle":  # apex (cx, y0), base y = y1: half-width grows linearly with depth
        cx = (x0 + x1) / 2
        depth = (y - y0) / s
        return (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= depth * s / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(scene: Scene) -> np.ndarray:
    """Per-object pixel coverage in [0, 1]: float32 ``[n_objects, H, W]`` (anti-aliased, 4x4 supersampling)."""
    size, ss = scene.image_size, _SUPERSAMPLE
    out = np.zeros((len(scene.objects), size, size), dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box  # shapes never leave their box: sample only there
        xs = x0 + (np.arange((x1 - x0) * ss, dtype=np.float64) + 0.5) / ss
        ys = y0 + (np.arange((y1 - y0) * ss, dtype=np.float64) + 0.5) / ss
        inside = _shape_inside(obj.shape, xs[None, :], ys[:, None], obj.box).astype(np.float32)
        out[i, y0:y1, x0:x1] = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return out


def render(scene: Scene) -> np.ndarray:
    """Render ``scene`` to a uint8 numpy image ``[H, W, 3]`` (anti-aliased edges, white background)."""
    cov = coverage(scene)
    img = np.empty((scene.image_size, scene.image_size, 3), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        a = cov[i][..., None]
        img = img * (1 - a) + a * np.asarray(PALETTE[obj.colour], dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` numpy image -> ``torch.uint8 [3, H, W]``."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def images_tensor(scenes: list[Scene]) -> torch.Tensor:
    """Render a list of scenes (same image size) to ``torch.uint8 [n, 3, H, W]``."""
    if not scenes:
        raise ValueError("scenes must not be empty")
    return torch.stack([to_tensor(render(s)) for s in scenes])


def object_phrase(obj: ShapeObject) -> str:
    """Caption phrase of one object, e.g. ``"a large red circle in the top left"``."""
    return f"a {obj.describe()} {POSITION_PHRASE[obj.position]}"


def caption(scene: Scene) -> str:
    """Caption listing every object in scene order: ``"a small red circle in the top left, a large ...
    on the right and a small blue square at the bottom"``. Parsed back by ``cm3leon.data.scorer``."""
    phrases = [object_phrase(o) for o in scene.objects]
    if not phrases:
        return "an empty picture"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]
