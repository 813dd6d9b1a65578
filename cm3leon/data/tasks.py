"""The paper's SFT task families (docs/recipe.md §6) on the shapes world, as documents of segments.

Every example has ``segments()``: its document in the paper's template, a list of text (``str``) and
image (``torch.uint8 [3, H, W]``) segments in order. The tokenizer's ``DocumentCodec`` writes ``<break>``
between consecutive segments, after the images are encoded to token grids. Templates:

=================  =======================================================================================
task               segments
=================  =======================================================================================
``text_to_image``  ``caption <break> image``  (the pre-training document; zero-shot T2I prompt)
``caption``        ``Describe the given picture. {caption} <break> image``
``edit``           ``Edit first image following the instruction <break> img1 <break> {instruction} <break>
                   img2``
``vqa``            ``Question: {q} Answer: {a}. <break> image``
``grounded``       ``Generate an image with {obj} at location (x0, y0) -> (x1, y1), ... and {obj} at
                   location (...) <break> image``   (boxes in pixels, half-open: x1 = x0 + side)
``segmentation``   ``Make high quality image from segmentation <break> cond <break> caption <break> image``
``edges``          ``Make high quality image from edges <break> cond <break> caption <break> image``
=================  =======================================================================================

:func:`make_example` builds example ``index`` of a task deterministically from ``(world.seed, index,
task)``; :func:`format_segments` prints a document with image placeholders (for logs and tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .edits import Edit, make_edit
from .shapes import Scene, ShapesWorld, caption, render, to_tensor
from .structure import edge_map, render_edges, render_segmentation, segmentation_mask
from .vqa import Question, make_question

TASKS: tuple[str, ...] = ("text_to_image", "caption", "edit", "vqa", "grounded", "segmentation", "edges")
EDIT_PREFIX = "Edit first image following the instruction"
CAPTION_PREFIX = "Describe the given picture."
GROUNDED_PREFIX = "Generate an image with"
STRUCTURE_PREFIX = "Make high quality image from"

Segment = str | torch.Tensor


def image_of(scene: Scene) -> torch.Tensor:
    """Rendered ``scene`` as ``torch.uint8 [3, H, W]``."""
    return to_tensor(render(scene))


@dataclass(frozen=True)
class CaptionExample:
    """A scene, its image and caption. ``text_to_image`` form: ``caption <break> image``; ``caption``
    (SFT) form: ``Describe the given picture. {caption} <break> image``."""

    scene: Scene
    image: torch.Tensor
    caption: str
    sft: bool = False

    def segments(self) -> list[Segment]:
        """The document's segments."""
        text = f"{CAPTION_PREFIX} {self.caption}" if self.sft else self.caption
        return [text, self.image]


@dataclass(frozen=True)
class EditExample:
    """Text-guided editing: before/after images and the instruction (scenes in ``edit``)."""

    edit: Edit
    before: torch.Tensor
    after: torch.Tensor

    @property
    def instruction(self) -> str:
        """The edit instruction, e.g. ``"move the red circle to the top left"``."""
        return self.edit.instruction

    def segments(self) -> list[Segment]:
        """``Edit first image following the instruction <break> img1 <break> instruction <break> img2``."""
        return [EDIT_PREFIX, self.before, self.instruction, self.after]


@dataclass(frozen=True)
class VQAExample:
    """A question about a scene's image, with its answer."""

    scene: Scene
    image: torch.Tensor
    question: Question

    def segments(self) -> list[Segment]:
        """``Question: {q} Answer: {a}. <break> image``."""
        return [f"Question: {self.question.question} Answer: {self.question.answer}.", self.image]


def box_phrase(box: tuple[int, int, int, int]) -> str:
    """``(x0, y0, x1, y1)`` -> ``"at location (x0, y0) -> (x1, y1)"``."""
    x0, y0, x1, y1 = box
    return f"at location ({x0}, {y0}) -> ({x1}, {y1})"


def grounded_prompt(objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    """``[("large red circle", (1, 2, 9, 10)), ...]`` -> ``"Generate an image with a large red circle at
    location (1, 2) -> (9, 10), ... and a ..."`` (the grounded task's text)."""
    if not objects:
        raise ValueError("objects must hold at least one (description, box) pair")
    parts = [f"a {description} {box_phrase(box)}" for description, box in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{GROUNDED_PREFIX} {listed}"


@dataclass(frozen=True)
class GroundedExample:
    """Spatially grounded generation: every object with its pixel box, then the image."""

    scene: Scene
    image: torch.Tensor

    @property
    def prompt(self) -> str:
        """``Generate an image with a large red circle at location (1, 2) -> (9, 10) and ...``."""
        return grounded_prompt([(o.describe(), o.box) for o in self.scene.objects])

    def segments(self) -> list[Segment]:
        """``{prompt} <break> image``."""
        return [self.prompt, self.image]


@dataclass(frozen=True)
class StructureExample:
    """Structure-guided generation: a condition image (``kind`` = "segmentation" or "edges"), the caption
    and the target image. ``labels`` is the segmentation id map (int64 ``[H, W]``) or edge map (bool)."""

    scene: Scene
    kind: str
    labels: torch.Tensor
    condition: torch.Tensor
    caption: str
    image: torch.Tensor

    def segments(self) -> list[Segment]:
        """``Make high quality image from {kind} <break> cond <break> caption <break> image``."""
        return [f"{STRUCTURE_PREFIX} {self.kind}", self.condition, self.caption, self.image]


Example = CaptionExample | EditExample | VQAExample | GroundedExample | StructureExample


def make_example(world: ShapesWorld, index: int, task: str) -> Example:
    """Example ``index`` of ``task`` (one of :data:`TASKS`) on scene ``index`` of ``world``; deterministic."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    scene = world.scene(index)
    rng = np.random.default_rng([world.seed, int(index), 1 + TASKS.index(task)])
    if task in ("text_to_image", "caption"):
        return CaptionExample(scene, image_of(scene), caption(scene), sft=task == "caption")
    if task == "edit":
        edit = make_edit(scene, rng)
        return EditExample(edit, image_of(edit.before), image_of(edit.after))
    if task == "vqa":
        return VQAExample(scene, image_of(scene), make_question(scene, rng))
    if task == "grounded":
        return GroundedExample(scene, image_of(scene))
    mask = segmentation_mask(scene)
    if task == "segmentation":
        return StructureExample(scene, task, mask, render_segmentation(mask), caption(scene), image_of(scene))
    edges = edge_map(mask)
    return StructureExample(scene, task, edges, render_edges(edges), caption(scene), image_of(scene))


def sft_examples(world: ShapesWorld, n: int, start: int = 0,
                 tasks: tuple[str, ...] = TASKS) -> list[Example]:
    """``n`` examples with tasks balanced round-robin: example ``i`` is task ``tasks[i % len(tasks)]``
    on scene ``i`` (``i`` from ``start``)."""
    if isinstance(tasks, str):  # iterating it would try the task "c", "a", ...
        raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}")
    if not tasks:
        raise ValueError("tasks must not be empty")
    return [make_example(world, i, tasks[i % len(tasks)]) for i in range(start, start + n)]


def format_segments(segments: list[Segment], image_token: str = "<image>") -> str:
    """A document as one string: ``" <break> "`` between segments, ``image_token`` for each image."""
    return " <break> ".join(s if isinstance(s, str) else image_token for s in segments)
