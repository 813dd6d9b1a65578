"""Task metrics on the shapes world, computed exactly from scenes (docs/recipe.md §6 task families).

An object is compared as its attribute tuple ``(colour, shape, position, size)``; a scene as the multiset
of its tuples. ``score = |expected ∩ detected| / max(|expected|, |detected|)``: 1 only when both lists
agree exactly, and missing or extra objects both cost.

- :func:`prompt_alignment`: text-to-image (and edit / structure-guided) outputs: the objects the scorer
  reads from the image vs the prompt's scene.
- :func:`caption_match`: a generated caption, parsed with the caption grammar, vs the scene.
- :func:`answer_from_image` / :func:`vqa_accuracy` (from ``vqa``): VQA.
- :func:`grounding_iou`: spatially grounded generation: mean box IoU of the prompt's objects.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from .scorer import ImageLike, read_scene
from .shapes import PALETTE, POSITION_PHRASE, SHAPES, SIZES, Scene, ShapeObject
from .vqa import answer_question

Attributes = tuple[str | None, str, str, str]  # (size or None when unstated, colour, shape, position)

_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASE.items()}
_OBJECT_RE = re.compile(
    rf"(?:({'|'.join(SIZES)}) )?({'|'.join(PALETTE)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(re.escape(p) for p in POSITION_PHRASE.values())})"
)


def attributes(obj: ShapeObject) -> Attributes:
    """``(size, colour, shape, position)`` of an object."""
    return (obj.size, obj.colour, obj.shape, obj.position)


def overlap_score(expected: Iterable[Attributes], found: Iterable[Attributes]) -> float:
    """``|expected ∩ found| / max(|expected|, |found|)`` over multisets; a ``None`` size in ``found``
    matches any size. 1.0 when both are empty."""
    exp, got = list(expected), list(found)
    if not exp and not got:
        return 1.0
    remaining = Counter(exp)
    matched = 0
    for size, *rest in sorted(got, key=lambda a: a[0] is None):  # exact sizes claim matches first
        keys = [k for k in remaining if remaining[k] and tuple(k[1:]) == tuple(rest) and size in (None, k[0])]
        if keys:
            remaining[keys[0]] -= 1
            matched += 1
    return matched / max(len(exp), len(got))


def prompt_alignment(image: ImageLike, scene: Scene) -> float:
    """How well ``image`` shows ``scene``: :func:`overlap_score` of the objects read by the scorer."""
    return overlap_score(map(attributes, scene.objects), map(attributes, read_scene(image).objects))


def parse_caption(text: str) -> list[Attributes]:
    """Objects named in a caption of the shapes grammar (``"a large red circle in the top left and ..."``);
    the size word is optional (``None`` when absent). Case- and whitespace-insensitive."""
    if not isinstance(text, str):  # e.g. None from a failed generation: not an AttributeError on .lower
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    norm = " ".join(text.lower().split())
    return [(m[1], m[2], m[3], _PHRASE_TO_POSITION[m[4]]) for m in _OBJECT_RE.finditer(norm)]


def caption_match(text: str, scene: Scene) -> float:
    """:func:`overlap_score` of the objects a generated caption names vs the scene's objects."""
    return overlap_score(map(attributes, scene.objects), parse_caption(text))


def answer_from_image(image: ImageLike, question: str) -> str:
    """Answer a shapes VQA question by reading the image with the scorer (an oracle VQA model)."""
    return answer_question(read_scene(image), question)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two half-open boxes ``(x0, y0, x1, y1)``."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_iou(image: ImageLike, scene: Scene) -> float:
    """Mean over the prompt's objects of the best IoU with a detected object of the same colour and shape
    (0 for an object not found). 1.0 for an empty scene."""
    if not scene.objects:
        return 1.0
    found = read_scene(image).objects
    return sum(max((box_iou(o.box, d.box) for d in found if (d.colour, d.shape) == (o.colour, o.shape)),
                   default=0.0) for o in scene.objects) / len(scene.objects)
