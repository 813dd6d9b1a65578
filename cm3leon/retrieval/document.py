"""The unit a memory bank stores and a retriever returns: one document with a caption, an image, or both."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import is_int

__all__ = ["RetrievalDocument"]


@dataclass(frozen=True, eq=False)
class RetrievalDocument:
    """One document of a memory bank; at least one of ``text`` and ``image`` is present. Documents compare
    by identity (two documents with equal fields are still two documents).

    Attributes:
        text: the caption (a non-empty string), or None.
        image: ``torch.uint8 [3, H, W]``, or None.
        token_ids: the document's global ids (``DocumentCodec.encode``): what gets prepended to prompts and
            training sequences. None for documents that are only searched by (e.g. a query caption).
    """

    text: str | None
    image: torch.Tensor | None
    token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise ValueError("a RetrievalDocument needs text or image: both text and image are None")
        if self.text is not None:
            if not isinstance(self.text, str):
                raise TypeError(f"text must be a str or None, got {type(self.text).__name__}")
            if not self.text:
                raise ValueError("text must be a non-empty string (use None for an image-only document)")
        if self.image is not None:
            if not isinstance(self.image, torch.Tensor):
                raise TypeError(f"image must be a torch.Tensor or None, got {type(self.image).__name__}")
            if self.image.dtype != torch.uint8 or self.image.ndim != 3 or self.image.shape[0] != 3:
                raise ValueError(f"image must be uint8 [3, H, W], got {self.image.dtype} of shape "
                                 f"{tuple(self.image.shape)}")
        if self.token_ids is not None:
            if not isinstance(self.token_ids, list) or not all(is_int(t) for t in self.token_ids):
                raise TypeError("token_ids must be a list of ints or None")
            if not self.token_ids:
                raise ValueError("token_ids must be non-empty (or None)")

    @property
    def multimodal(self) -> bool:
        """True when the document holds both text and an image (the retriever prefers these)."""
        return self.text is not None and self.image is not None
