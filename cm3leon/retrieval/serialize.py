"""Documents <-> flat tensors, so a memory bank is one safetensors file (no pickle).

Variable-length fields (caption bytes, token ids) are concatenated with an offsets tensor ``[N + 1]``;
images are stacked per distinct shape (``images.HxW``) with each document's group and row.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .document import RetrievalDocument

__all__ = ["documents_from_tensors", "documents_to_tensors"]


def _ragged(rows: Sequence[Sequence[int] | None], dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values concatenated, offsets [N + 1], present [N]) of rows that may be None."""
    present = torch.tensor([r is not None for r in rows], dtype=torch.bool)
    lengths = torch.tensor([0 if r is None else len(r) for r in rows], dtype=torch.int64)
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    flat = torch.tensor([v for r in rows if r is not None for v in r], dtype=dtype)
    return flat, offsets, present


def documents_to_tensors(documents: Sequence[RetrievalDocument]) -> dict[str, torch.Tensor]:
    texts = [None if d.text is None else list(d.text.encode("utf-8")) for d in documents]
    tensors = dict(zip(("text_bytes", "text_offsets", "has_text"), _ragged(texts, torch.uint8)))
    tensors.update(zip(("token_ids", "token_offsets", "has_tokens"),
                       _ragged([d.token_ids for d in documents], torch.int64)))
    shapes: dict[tuple[int, int], list[torch.Tensor]] = {}
    group = torch.full((len(documents),), -1, dtype=torch.int64)
    row = torch.full((len(documents),), -1, dtype=torch.int64)
    for i, d in enumerate(documents):
        if d.image is not None:
            key = (int(d.image.shape[1]), int(d.image.shape[2]))
            stack = shapes.setdefault(key, [])
            group[i], row[i] = list(shapes).index(key), len(stack)
            stack.append(d.image)
    tensors["image_group"], tensors["image_row"] = group, row
    tensors["image_shapes"] = torch.tensor(list(shapes), dtype=torch.int64).reshape(-1, 2)
    for g, stack in enumerate(shapes.values()):
        tensors[f"images.{g}"] = torch.stack(stack).contiguous()
    return tensors


def documents_from_tensors(tensors: dict[str, torch.Tensor]) -> list[RetrievalDocument]:
    """Inverse of :func:`documents_to_tensors` (KeyError / ValueError on inconsistent contents)."""
    text_bytes = tensors["text_bytes"].numpy().tobytes()
    text_off, has_text = tensors["text_offsets"].tolist(), tensors["has_text"].tolist()
    token_ids = tensors["token_ids"]
    token_off, has_tokens = tensors["token_offsets"].tolist(), tensors["has_tokens"].tolist()
    group, row = tensors["image_group"].tolist(), tensors["image_row"].tolist()
    images = [tensors[f"images.{g}"] for g in range(tensors["image_shapes"].shape[0])]
    n = len(has_text)
    if not len(has_tokens) == len(group) == len(row) == n or len(text_off) != n + 1 or len(token_off) != n + 1:
        raise ValueError("document tensors disagree on the number of documents")
    docs = []
    for i in range(n):
        text = text_bytes[text_off[i]:text_off[i + 1]].decode("utf-8") if has_text[i] else None
        ids = token_ids[token_off[i]:token_off[i + 1]].tolist() if has_tokens[i] else None
        # out-of-range positions would raise IndexError (or, negative, silently pick another image)
        if group[i] >= len(images) or group[i] >= 0 and not 0 <= row[i] < len(images[group[i]]):
            raise ValueError(f"document {i} points at image {row[i]} of group {group[i]}, which does not "
                             "exist")
        image = images[group[i]][row[i]] if group[i] >= 0 else None
        docs.append(RetrievalDocument(text, image, ids))
    return docs
