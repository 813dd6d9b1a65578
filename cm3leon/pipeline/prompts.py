"""Inference prompts in exactly the layouts the model was trained on.

Every prompt starts with ``<eos>`` (training sequences precede every document with ``<eos>``), then the
retrieved documents, each followed by ``<eos>``, then the query document up to the point where generation
starts:

====================  ==============================================================================
task                  conditional stream (what the model continues)
====================  ==============================================================================
text -> image         ``<eos> [R1 <eos>] [R2 <eos>] caption <break>``  then h·w image tokens
image -> text         ``<eos> [R <eos>] [instruction] <mask:0> <break> IMAGE <infill> <mask:0>``
VQA                   ``<eos> [R <eos>] Question: {q} Answer: <mask:0> <break> IMAGE <infill> <mask:0>``
text infilling        ``<eos> A <mask:0> B <mask:1> C <infill> <mask:0>``  (span 0, then ``<mask:1>`` ...)
edit                  ``<eos> Edit first image following the instruction <break> IMAGE <break> {instr} <break>``
structure             ``<eos> Make high quality image from {kind} <break> COND <break> caption <break>``
grounded              ``<eos> Generate an image with a {obj} at location (x0, y0) -> (x1, y1) ... <break>``
====================  ==============================================================================

The unconditional streams of classifier-free guidance replace the conditioning (the caption, the retrieved
documents, the instruction, the condition image) by one ``<mask>`` each and keep the task's fixed words, so
they share the conditional stream's structure: text -> image and grounded use ``<eos> <mask> <break>``;
edit's image-only stream masks the instruction and its unconditional stream masks the image as well;
structure's unconditional stream masks the condition image and the caption.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._checks import is_int
from ..data.tasks import CAPTION_PREFIX, EDIT_PREFIX, STRUCTURE_PREFIX, grounded_prompt
from ..tokenizer import NUM_SENTINELS, DocumentCodec, Vocabulary

__all__ = ["CAPTION_PREFIX", "MASK_TEXT", "GuidedPrompt", "PromptBuilder"]

MASK_TEXT = "<mask>"  # how a span to infill is written inside a text segment given to :meth:`PromptBuilder.infill`
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class GuidedPrompt:
    """The streams of one guided request: ``conditional`` (the full prompt), ``unconditional``, and for
    three-stream instruct guidance ``image_conditional`` (the prompt without the instruction)."""

    conditional: list[int]
    unconditional: list[int]
    image_conditional: list[int] | None = None


class PromptBuilder:
    """Builds every task's prompt from a :class:`DocumentCodec` (text BPE + vocabulary + image grid)."""

    def __init__(self, codec: DocumentCodec) -> None:
        if not isinstance(codec, DocumentCodec):
            raise TypeError(f"codec must be a DocumentCodec, got {type(codec).__name__}")
        self.codec = codec
        self.vocabulary: Vocabulary = codec.vocabulary

    # ---- pieces ----------------------------------------------------------------------------------------
    def _text(self, text: str, name: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, got {type(text).__name__}")
        return self.codec.encode_segment(text, name=name)

    def _image(self, grid: torch.Tensor, name: str) -> list[int]:
        return self.codec.encode_segment(grid, name=name)

    def _context(self, retrieved: Sequence[Sequence[int]]) -> list[int]:
        """``<eos> [R1 <eos>] [R2 <eos>] ...``: the start of every prompt."""
        eos = self.vocabulary.eos_id
        ids = [eos]
        for i, doc in enumerate(retrieved):
            doc = list(doc)
            if not doc:
                raise ValueError(f"retrieved[{i}] is an empty document")
            ids += doc + [eos]
        return ids

    def _masked(self, *segments: list[int] | None) -> list[int]:
        """Segments joined by ``<break>``, with ``None`` standing for a masked segment (one ``<mask>``)."""
        ids: list[int] = []
        for i, seg in enumerate(segments):
            if i:
                ids.append(self.vocabulary.break_id)
            ids += [self.vocabulary.mask_id] if seg is None else seg
        return ids

    # ---- image generation --------------------------------------------------------------------------------
    def text_to_image(self, caption: str, retrieved: Sequence[Sequence[int]] = ()) -> GuidedPrompt:
        """``<eos> [R <eos>]... caption <break>`` and its unconditional ``<eos> <mask> <break>``."""
        cond = self._context(retrieved) + self._text(caption, "caption") + [self.vocabulary.break_id]
        return GuidedPrompt(cond, self._context(()) + self._masked(None, []))

    def grounded(self, objects: Sequence[tuple[str, Box]]) -> GuidedPrompt:
        """The grounded-generation text (objects with pixel boxes) then ``<break>``."""
        objects = list(objects)
        for i, obj in enumerate(objects):
            if (not isinstance(obj, (tuple, list)) or len(obj) != 2 or not isinstance(obj[0], str)
                    or len(obj[1]) != 4 or not all(is_int(c) for c in obj[1])):
                raise ValueError(f"objects[{i}] must be (description, (x0, y0, x1, y1)) with int pixel "
                                 f"coordinates, got {obj!r}")
            x0, y0, x1, y1 = obj[1]
            if not (0 <= x0 < x1 and 0 <= y0 < y1):  # boxes are half-open pixel ranges, as in training
                raise ValueError(f"objects[{i}] box must have 0 <= x0 < x1 and 0 <= y0 < y1, got {obj[1]}")
        text = grounded_prompt(objects)
        return GuidedPrompt(self._context(()) + self._text(text, "objects") + [self.vocabulary.break_id],
                            self._context(()) + self._masked(None, []))

    def structure(self, condition: torch.Tensor, kind: str, caption: str) -> GuidedPrompt:
        """``Make high quality image from {kind} <break> COND <break> caption <break>``; the unconditional
        stream masks the condition image and the caption."""
        if kind not in ("edges", "segmentation"):
            raise ValueError(f"kind must be 'edges' or 'segmentation', got {kind!r}")
        head = self._text(f"{STRUCTURE_PREFIX} {kind}", "kind")
        cond = self._masked(head, self._image(condition, "condition"), self._text(caption, "caption"), [])
        return GuidedPrompt(self._context(()) + cond, self._context(()) + self._masked(head, None, None, []))

    def edit(self, image: torch.Tensor, instruction: str) -> GuidedPrompt:
        """``Edit first image following the instruction <break> IMAGE <break> instruction <break>`` with the
        image-only stream (instruction masked) and the unconditional one (image and instruction masked)."""
        head, grid = self._text(EDIT_PREFIX, "prefix"), self._image(image, "image")
        full = self._masked(head, grid, self._text(instruction, "instruction"), [])
        return GuidedPrompt(self._context(()) + full, self._context(()) + self._masked(head, None, None, []),
                            self._context(()) + self._masked(head, grid, None, []))

    # ---- text generation by infilling --------------------------------------------------------------------
    def image_to_text(self, image: torch.Tensor, retrieved: Sequence[Sequence[int]] = (),
                      instruction: str | None = None) -> list[int]:
        """``<eos> [R <eos>] [instruction] <mask:0> <break> IMAGE <infill> <mask:0>``: the caption is the
        masked span (``instruction``, e.g. :data:`CAPTION_PREFIX`, for models tuned on that template)."""
        head = [] if instruction is None else self._text(instruction, "instruction")
        return self._infill_query(retrieved, head, self._image(image, "image"))

    def vqa(self, image: torch.Tensor, question: str, retrieved: Sequence[Sequence[int]] = ()) -> list[int]:
        """``<eos> [R <eos>] Question: {q} Answer: <mask:0> <break> IMAGE <infill> <mask:0>``."""
        head = self._text(f"Question: {question} Answer:", "question")
        return self._infill_query(retrieved, head, self._image(image, "image"))

    def _infill_query(self, retrieved: Sequence[Sequence[int]], head: list[int], grid: list[int]) -> list[int]:
        v = self.vocabulary
        return (self._context(retrieved) + head + [v.sentinel_id(0), v.break_id] + grid
                + [v.infill_id, v.sentinel_id(0)])

    def infill(self, segments: Sequence[str | torch.Tensor]) -> tuple[list[int], int]:
        """A document whose text segments contain ``<mask>`` markers -> (``<eos> A <mask:0> B ... <infill>``,
        number of spans). The generation of span ``i`` starts after ``<mask:i>`` is appended.

        Whitespace just before a marker belongs to the span (the BPE attaches leading spaces to words), so
        ``"a red <mask> left"`` is encoded as ``"a red" <mask:0> " left"``.
        """
        if isinstance(segments, (str, torch.Tensor)) or not len(segments):
            raise ValueError("segments must be a non-empty list of str / image segments")
        v = self.vocabulary
        ids, n_spans = self._context(()), 0
        for i, seg in enumerate(segments):
            if i:
                ids.append(v.break_id)
            if not isinstance(seg, str):
                ids += self._image(seg, f"segments[{i}]")
                continue
            pieces = seg.split(MASK_TEXT)
            for j, piece in enumerate(pieces):
                if j:
                    if n_spans == NUM_SENTINELS:
                        raise ValueError(f"segments hold more than {NUM_SENTINELS} {MASK_TEXT} spans")
                    ids.append(v.sentinel_id(n_spans))
                    n_spans += 1
                piece = piece.rstrip() if j < len(pieces) - 1 else piece
                if piece:
                    ids += self._text(piece, f"segments[{i}]")
        if n_spans == 0:
            raise ValueError(f"segments hold no {MASK_TEXT} span to infill")
        return ids + [v.infill_id], n_spans
