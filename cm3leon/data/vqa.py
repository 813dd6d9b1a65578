"""Visual question answering on shapes scenes (docs/recipe.md §6: ``Question: {q} Answer: {a}.``).

:func:`make_question` samples a question with its answer (built from the sampled object);
:func:`answer_question` answers any question of the same grammar from a scene by parsing it, so it can
answer from the scene the scorer reads out of an image (``answer_question(read_scene(img), q)``).

Question kinds and answers:

- ``color``: "What color is the circle?" (the shape is unique in the scene) or "What color is the circle
  in the top left?" -> a palette name
- ``shape``: "What shape is the red object?" -> a shape name
- ``count``: "How many shapes are there?" -> a digit
- ``count_shape``: "How many circles are there?" -> a digit (may be "0")
- ``exists``: "Is there a red circle?" -> "yes" / "no" (half of each)
- ``position``: "Where is the red circle?" -> a position name, e.g. "top left"
- ``size``: "Is the red circle small or large?" -> "small" / "large"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .shapes import PALETTE, POSITION_PHRASE, SHAPES, Scene, ShapeObject

QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "count", "count_shape", "exists", "position", "size")
#: Answer given when a question names an object the scene does not contain.
UNKNOWN = "unknown"

_COL = "|".join(PALETTE)
_SHP = "|".join(SHAPES)
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASE.items()}
_PHR = "|".join(re.escape(p) for p in POSITION_PHRASE.values())
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("color", re.compile(rf"what color is the ({_SHP})(?: ({_PHR}))?\?")),
    ("shape", re.compile(rf"what shape is the ({_COL}) object\?")),
    ("count", re.compile(r"how many shapes are there\?")),
    ("count_shape", re.compile(rf"how many ({_SHP})s are there\?")),
    ("exists", re.compile(rf"is there an? ({_COL}) ({_SHP})\?")),
    ("position", re.compile(rf"where is the ({_COL}) ({_SHP})\?")),
    ("size", re.compile(rf"is the ({_COL}) ({_SHP}) small or large\?")),
)


@dataclass(frozen=True)
class Question:
    """A VQA item: question kind (one of :data:`QUESTION_KINDS`), question text and answer."""

    kind: str
    question: str
    answer: str


def _find(scene: Scene, colour: str, shape: str) -> ShapeObject | None:
    return next((o for o in scene.objects if o.colour == colour and o.shape == shape), None)


def answer_question(scene: Scene, question: str) -> str:
    """Answer ``question`` (grammar of this module, case-insensitive) about ``scene``.

    Returns :data:`UNKNOWN` when the question names an object the scene lacks. Raises ValueError for a
    question outside the grammar.
    """
    q = " ".join(question.lower().split())
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(q)
        if m is None:
            continue
        if kind == "count":
            return str(len(scene.objects))
        if kind == "count_shape":
            return str(sum(o.shape == m[1] for o in scene.objects))
        if kind == "color":
            where = _PHRASE_TO_POSITION.get(m[2]) if m[2] else None
            hits = [o for o in scene.objects if o.shape == m[1] and where in (None, o.position)]
            return hits[0].colour if len(hits) == 1 else UNKNOWN
        if kind == "shape":
            hits = [o for o in scene.objects if o.colour == m[1]]
            return hits[0].shape if len(hits) == 1 else UNKNOWN
        obj = _find(scene, m[1], m[2])
        if kind == "exists":
            return "yes" if obj is not None else "no"
        if obj is None:
            return UNKNOWN
        return obj.position if kind == "position" else obj.size
    raise ValueError(f"question {question!r} is not in the shapes VQA grammar")


def make_question(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> Question:
    """Sample a question about ``scene`` (which must have at least one object) with its answer."""
    if not scene.objects:
        raise ValueError("scene has no objects to ask about")
    if kind is None:
        kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    elif kind not in QUESTION_KINDS:
        raise ValueError(f"kind must be one of {QUESTION_KINDS}, got {kind!r}")
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if kind == "color":
        unique = sum(o.shape == obj.shape for o in scene.objects) == 1
        where = "" if unique else " " + POSITION_PHRASE[obj.position]
        return Question(kind, f"What color is the {obj.shape}{where}?", obj.colour)
    if kind == "shape":
        return Question(kind, f"What shape is the {obj.colour} object?", obj.shape)
    if kind == "count":
        return Question(kind, "How many shapes are there?", str(len(scene.objects)))
    if kind == "count_shape":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return Question(kind, f"How many {shape}s are there?", str(sum(o.shape == shape for o in scene.objects)))
    if kind == "exists":
        colour, shape = obj.colour, obj.shape
        if rng.random() < 0.5:  # a "no" question: an absent colour/shape pair
            absent = [(c, s) for c in PALETTE for s in SHAPES if _find(scene, c, s) is None]
            colour, shape = absent[int(rng.integers(len(absent)))]
        answer = "yes" if _find(scene, colour, shape) is not None else "no"
        return Question(kind, f"Is there a {colour} {shape}?", answer)
    if kind == "position":
        return Question(kind, f"Where is the {obj.colour} {obj.shape}?", obj.position)
    return Question(kind, f"Is the {obj.colour} {obj.shape} small or large?", obj.size)


def normalize_answer(answer: str) -> str:
    """Lower-case, collapse whitespace, strip a trailing period and articles: the VQA comparison form."""
    words = answer.lower().strip().rstrip(".").split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Exact-match accuracy of predicted answers after :func:`normalize_answer`."""
    for name, value in (("predictions", predictions), ("answers", answers)):
        if isinstance(value, str):  # would be scored character by character
            raise TypeError(f"{name} must be a list of answers, got the string {value!r}")
    if len(predictions) != len(answers):
        raise ValueError(f"predictions ({len(predictions)}) and answers ({len(answers)}) differ in length")
    if not answers:
        raise ValueError("answers must not be empty")
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)) / len(answers)
