"""Document embeddings: the average of a document's L2-normalised text and image embeddings (CM3Leon's
retriever), or the one modality a document has."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .._checks import check_int
from .document import RetrievalDocument
from .encoder import ImageTextEncoder

__all__ = ["TextTokenizerLike", "check_documents", "embed_documents", "encode_captions", "image_groups"]


class TextTokenizerLike(Protocol):
    """Anything with ``encode(str) -> list[int]`` (a :class:`cm3leon.tokenizer.TextTokenizer`, or the
    tokenizer an encoder adapter brings)."""

    def encode(self, text: str) -> list[int]: ...


def check_documents(docs: object, name: str = "docs") -> list[RetrievalDocument]:
    """Validates a sequence of :class:`RetrievalDocument`."""
    if isinstance(docs, (str, RetrievalDocument)) or not isinstance(docs, Sequence):
        raise TypeError(f"{name} must be a sequence of RetrievalDocument, got {type(docs).__name__}")
    for i, doc in enumerate(docs):
        if not isinstance(doc, RetrievalDocument):
            raise TypeError(f"{name}[{i}] must be a RetrievalDocument, got {type(doc).__name__}")
    return list(docs)


def encode_captions(encoder: ImageTextEncoder, text_tokenizer: TextTokenizerLike, texts: Sequence[str],
                    ) -> torch.Tensor:
    """Strings -> L2-normalised text embeddings ``[N, E]`` (tokenized with ``text_tokenizer``)."""
    return encoder.encode_texts([text_tokenizer.encode(t) for t in texts])


def image_groups(docs: Sequence[RetrievalDocument], rows: Sequence[int]) -> list[list[int]]:
    """The ``rows`` whose document has an image, grouped by image size (each group stacks into one batch)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in rows:
        if docs[i].image is not None:
            groups.setdefault(tuple(docs[i].image.shape), []).append(i)
    return list(groups.values())


@torch.inference_mode()
def embed_documents(docs: Sequence[RetrievalDocument], encoder: ImageTextEncoder,
                    text_tokenizer: TextTokenizerLike, *, batch_size: int = 256, progress: bool = False,
                    ) -> torch.Tensor:
    """Embeds documents for a memory bank: float32 ``[N, E]`` on the CPU.

    A document with text and image gets ``(t + i) / 2`` with ``t`` and ``i`` its L2-normalised text and
    image embeddings (so its norm is at most 1); a document with one modality gets that embedding.
    """
    docs = check_documents(docs)
    check_int("batch_size", batch_size, 1)
    out = torch.zeros(len(docs), encoder.embed_dim)
    count = torch.zeros(len(docs), 1)
    bar = tqdm(total=len(docs), desc="embedding documents", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(docs), batch_size):
        chunk = range(start, min(start + batch_size, len(docs)))
        with_text = [i for i in chunk if docs[i].text is not None]
        if with_text:
            texts = [docs[i].text for i in with_text]
            out[with_text] += encode_captions(encoder, text_tokenizer, texts).float().cpu()
            count[with_text] += 1
        for rows in image_groups(docs, chunk):
            out[rows] += encoder.encode_images(torch.stack([docs[i].image for i in rows])).float().cpu()
            count[rows] += 1
        bar.update(len(chunk))
    bar.close()
    return out / count
