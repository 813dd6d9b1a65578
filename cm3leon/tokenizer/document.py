"""Documents <-> global token ids (docs/recipe.md §2, §6).

A document is a list of segments: text (``str``) or an image token grid (int64 tensor ``[h, w]`` of
codebook indices, as :meth:`ImageTokenizer.encode` returns per image). Serialised layout:

- segments in order, ``<break>`` between every two consecutive segments. Documents alternate modality, so
  this is the paper's "``<break>`` at every switch of modality"; two adjacent segments of the same
  modality (e.g. two images, as in some editing layouts) are separated by ``<break>`` as well, which keeps
  them apart when parsing back;
- a caption-image document is therefore ``caption <break> image`` (text first);
- several documents are joined with ``<eos>`` between them (:meth:`DocumentCodec.encode_documents`).

Image grids are written row-major. Parsing needs each grid's ``(h, w)``: pass ``image_shape`` (the image
tokenizer's token grid); without it a square grid is inferred from the run length.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import is_int
from .image import ImageTokenizer
from .text import TextTokenizer
from .vocabulary import Vocabulary

__all__ = ["DocumentCodec", "Segment", "tokenize_images"]

Segment = str | torch.Tensor


class DocumentCodec:
    """Serialises documents with one text tokenizer, one vocabulary and one image grid shape.

    Args:
        text_tokenizer: the BPE; its ``vocab_size`` must equal ``vocabulary.text_size``.
        vocabulary: the shared id space.
        image_shape: ``(h, w)`` of image token grids, or None to infer square grids when parsing.
    """

    def __init__(self, text_tokenizer: TextTokenizer, vocabulary: Vocabulary,
                 image_shape: tuple[int, int] | None = None) -> None:
        if text_tokenizer.vocab_size != vocabulary.text_size:
            raise ValueError(f"text_tokenizer.vocab_size ({text_tokenizer.vocab_size}) != "
                             f"vocabulary.text_size ({vocabulary.text_size})")
        if image_shape is not None:
            if len(image_shape) != 2 or not all(is_int(s) and s >= 1 for s in image_shape):
                raise ValueError(f"image_shape must be a pair of positive ints, got {image_shape!r}")
            image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.text_tokenizer = text_tokenizer
        self.vocabulary = vocabulary
        self.image_shape = image_shape

    # ---- segments -> ids -------------------------------------------------------------------------------
    def encode_segment(self, segment: Segment, *, name: str = "segment") -> list[int]:
        """One text or image segment -> global ids (no separators)."""
        if isinstance(segment, str):
            if not segment:
                raise ValueError(f"{name} is an empty string; empty text segments cannot round-trip")
            return self.vocabulary.text_to_global(self.text_tokenizer.encode(segment))
        if isinstance(segment, torch.Tensor):
            if segment.ndim != 2 or segment.dtype.is_floating_point or segment.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer image token grid [h, w], "
                                 f"got {segment.dtype} of shape {tuple(segment.shape)}")
            if self.image_shape is not None and tuple(segment.shape) != self.image_shape:
                raise ValueError(f"{name} has grid shape {tuple(segment.shape)}, expected {self.image_shape}")
            codes = segment.reshape(-1).tolist()
            return self.vocabulary.image_to_global(codes)
        raise TypeError(f"{name} must be a str or an image token grid tensor, got {type(segment).__name__}")

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        """A document (list of segments) -> global ids, ``<break>`` between consecutive segments."""
        if isinstance(segments, (str, torch.Tensor)) or not len(segments):
            raise ValueError("segments must be a non-empty list of str / image grid segments")
        ids: list[int] = []
        for i, seg in enumerate(segments):
            if i:
                ids.append(self.vocabulary.break_id)
            ids.extend(self.encode_segment(seg, name=f"segments[{i}]"))
        return ids

    def encode_caption_image(self, caption: str, image_tokens: torch.Tensor) -> list[int]:
        """The caption-image document ``caption <break> image`` (text first)."""
        return self.encode([caption, image_tokens])

    def text_to_image_prompt(self, caption: str) -> list[int]:
        """The zero-shot text-to-image prompt ``<eos> caption <break>`` (docs/recipe.md §2): sample
        ``h·w`` image tokens after it."""
        return [self.vocabulary.eos_id, *self.encode_segment(caption, name="caption"), self.vocabulary.break_id]

    def encode_documents(self, documents: Sequence[Sequence[Segment]]) -> list[int]:
        """Several documents -> ids with ``<eos>`` between them."""
        ids: list[int] = []
        for i, doc in enumerate(documents):
            if i:
                ids.append(self.vocabulary.eos_id)
            ids.extend(self.encode(doc))
        return ids

    # ---- ids -> segments -------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int] | torch.Tensor) -> list[Segment]:
        """Global ids of one document -> its segments.

        Raises ValueError (naming ``ids``) for ids outside the vocabulary, specials other than ``<break>``,
        a run mixing text and image ids, an empty run, or an image run whose length does not match the grid.
        """
        ids = _as_list(ids)
        segments: list[Segment] = []
        for run in _split(ids, self.vocabulary.break_id):
            segments.append(self._decode_run(run))
        return segments

    def decode_documents(self, ids: Sequence[int] | torch.Tensor) -> list[list[Segment]]:
        """Ids of ``<eos>``-separated documents -> a list of documents (empty ones are skipped, so a leading
        or trailing ``<eos>`` is accepted)."""
        return [self.decode(doc) for doc in _split(_as_list(ids), self.vocabulary.eos_id) if doc]

    def _decode_run(self, run: list[int]) -> Segment:
        vocab = self.vocabulary
        if not run:
            raise ValueError("ids contain an empty segment (two separators in a row, or one at an end)")
        for t in run:
            if not 0 <= t < len(vocab):
                raise ValueError(f"ids contain {t}, outside the vocabulary [0, {len(vocab)})")
            if vocab.is_special(t):
                raise ValueError(f"ids contain the special {vocab.special_name(t)} inside a segment; "
                                 "decode takes plain documents (not CM3-transformed sequences)")
        if all(vocab.is_text(t) for t in run):
            return self.text_tokenizer.decode(vocab.global_to_text(run))
        if all(vocab.is_image(t) for t in run):
            h, w = self._grid_shape(len(run))
            return torch.tensor(vocab.global_to_image(run), dtype=torch.int64).view(h, w)
        raise ValueError("ids contain a segment mixing text and image ids without a <break> between them")

    def _grid_shape(self, n: int) -> tuple[int, int]:
        if self.image_shape is not None:
            if n != self.image_shape[0] * self.image_shape[1]:
                raise ValueError(f"ids contain an image run of {n} tokens, expected "
                                 f"{self.image_shape[0]}x{self.image_shape[1]}")
            return self.image_shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"ids contain an image run of {n} tokens, not a square grid; pass image_shape")
        return side, side


def tokenize_images(documents: Sequence[Sequence[Segment | torch.Tensor]], image_tokenizer: ImageTokenizer,
                    ) -> list[list[Segment]]:
    """Replaces every image segment ``[3, H, W]`` (uint8 or float 0..1, as ``cm3leon.data`` tasks produce) by
    its token grid ``[h, w]``, encoding all images of all documents in one batched call. Text segments and
    grids (2-D tensors) pass through unchanged."""
    images = [seg for doc in documents for seg in doc if isinstance(seg, torch.Tensor) and seg.ndim == 3]
    grids = iter(image_tokenizer.encode(torch.stack(images)) if images else ())
    return [[next(grids) if isinstance(seg, torch.Tensor) and seg.ndim == 3 else seg for seg in doc]
            for doc in documents]


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        return ids.tolist()
    out = list(ids)
    if not all(is_int(t) for t in out):
        raise TypeError("ids must be a sequence of ints")
    return out


def _split(ids: list[int], sep: int) -> list[list[int]]:
    runs: list[list[int]] = [[]]
    for t in ids:
        if t == sep:
            runs.append([])
        else:
            runs[-1].append(t)
    return runs
