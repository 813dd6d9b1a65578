"""Retrieval-augmented training examples: an ``ExampleSource`` for ``cm3leon.data.PackedLoader``.

Example ``i`` is ``training_sequence(query_i, [r1, r2, r3], vocabulary, ...)``: the query document (its global
ids) preceded by the documents the retriever finds for it with query dropout on (two by caption, two by image,
three kept). Everything random (dropout and the CM3 masking) is drawn from a generator keyed by ``(seed,
epoch, i)``, so an example is the same every time it is read. Build the documents from shapes scenes
(``ShapesCaptions``) or real data (``ImageCaptionFolder``) with :func:`caption_image_documents`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from cm3leon.data.packing import check_seed, derive_seed
from cm3leon.objective import (CM3Example, check_max_seq_len, check_objective_args, check_probability,
                               training_sequence)
from cm3leon.tokenizer import DocumentCodec, ImageTokenizer, Vocabulary
from cm3leon_kernels._checks import as_int

from .._checks import check_int
from .bank import MemoryBank
from .document import RetrievalDocument
from .embed import TextTokenizerLike, check_documents, embed_documents
from .encoder import ImageTextEncoder
from .retriever import Retriever
from .training import PairSource

__all__ = ["RetrievalAugmentedSource", "caption_image_documents"]


def caption_image_documents(pairs: PairSource, codec: DocumentCodec, image_tokenizer: ImageTokenizer, *,
                            batch_size: int = 64, progress: bool = False) -> list[RetrievalDocument]:
    """``(image, caption)`` items (``ShapesCaptions``, ``ImageCaptionFolder``) -> documents whose
    ``token_ids`` are ``caption <break> image tokens`` (the images tokenized in batches)."""
    check_int("batch_size", batch_size, 1)
    docs: list[RetrievalDocument] = []
    bar = tqdm(total=len(pairs), desc="tokenizing documents", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pairs), batch_size):
        items = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
        grids = image_tokenizer.encode(torch.stack([image for image, _ in items]))
        for (image, text), grid in zip(items, grids):
            docs.append(RetrievalDocument(text, image, codec.encode_caption_image(text, grid)))
        bar.update(len(items))
    bar.close()
    return docs


class RetrievalAugmentedSource:
    """Deterministic retrieval-augmented CM3 examples over ``queries``.

    Args:
        queries: the training documents (each needs ``token_ids``).
        retriever: searches the bank (usually holding the same documents: the 0.9 rule skips the query).
        vocabulary: the shared id space.
        seed: keys every random draw, with the epoch and the index.
        max_seq_len: longest training sequence (passed to ``training_sequence``).
        poisson_rate / max_spans / transform_probability: the CM3 masking (``training_sequence``).
        per_modality / keep: documents retrieved by caption and by image, and how many are kept.
    """

    def __init__(self, queries: Sequence[RetrievalDocument], retriever: Retriever, vocabulary: Vocabulary, *,
                 seed: int, max_seq_len: int, poisson_rate: float = 1.0, max_spans: int = 16,
                 per_modality: int = 2, keep: int = 3, transform_probability: float = 1.0) -> None:
        queries = check_documents(queries, "queries")
        for i, q in enumerate(queries):
            if q.token_ids is None:
                raise ValueError(f"queries[{i}] has no token_ids")
        if not isinstance(retriever, Retriever):
            raise TypeError(f"retriever must be a Retriever, got {type(retriever).__name__}")
        for i, d in enumerate(retriever.bank.documents):
            if d.token_ids is None:
                raise ValueError(f"retriever.bank.documents[{i}] has no token_ids (they are prepended to "
                                 "examples)")
        # checked here, not when the first example is read (possibly in a loader's worker process)
        if not isinstance(vocabulary, Vocabulary):
            raise TypeError(f"vocabulary must be a Vocabulary, got {type(vocabulary).__name__}")
        seed, max_seq_len = check_seed(seed), check_max_seq_len(max_seq_len)
        for name, value in (("per_modality", per_modality), ("keep", keep)):
            check_int(name, value, 1)
        self.queries, self.retriever, self.vocabulary = queries, retriever, vocabulary
        self.seed, self.max_seq_len = seed, max_seq_len
        self.poisson_rate, self.max_spans = check_objective_args(poisson_rate, max_spans)
        self.transform_probability = check_probability("transform_probability", transform_probability)
        self.per_modality, self.keep = per_modality, keep
        self.epoch = 0

    @classmethod
    def from_pairs(cls, pairs: PairSource, encoder: ImageTextEncoder, text_tokenizer: TextTokenizerLike,
                   codec: DocumentCodec, image_tokenizer: ImageTokenizer, *, seed: int, max_seq_len: int,
                   index: str = "flat", progress: bool = False, **kwargs) -> RetrievalAugmentedSource:
        """Tokenizes and embeds ``(image, caption)`` items (shapes or an image folder), puts them in a bank
        (``index`` kind) and returns the source over the same documents."""
        docs = caption_image_documents(pairs, codec, image_tokenizer, progress=progress)
        bank = MemoryBank(encoder.embed_dim, index=index)
        bank.add(docs, embed_documents(docs, encoder, text_tokenizer, progress=progress))
        return cls(docs, Retriever(encoder, bank, text_tokenizer), codec.vocabulary, seed=seed,
                   max_seq_len=max_seq_len, **kwargs)

    def __len__(self) -> int:
        return len(self.queries)

    def set_epoch(self, epoch: int) -> None:
        """Changes the draws (dropout, masking) for a new pass over the data."""
        self.epoch = as_int("epoch", epoch)

    def generator(self, index: int) -> torch.Generator:
        """The generator of example ``index`` in the current epoch."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))

    def retrieved(self, index: int, generator: torch.Generator) -> list[RetrievalDocument]:
        """The documents retrieved for example ``index`` (draws dropout from ``generator``)."""
        return self.retriever.retrieve_for_training([self.queries[index]], generator=generator,
                                                    per_modality=self.per_modality, keep=self.keep)[0]

    def __getitem__(self, index: int) -> CM3Example:
        index = as_int("index", index)  # numpy / torch integer scalars too, as samplers produce
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        gen = self.generator(index)
        docs = self.retrieved(index, gen)
        return training_sequence(self.queries[index].token_ids, [d.token_ids for d in docs], self.vocabulary,
                                 generator=gen, max_seq_len=self.max_seq_len, poisson_rate=self.poisson_rate,
                                 max_spans=self.max_spans, transform_probability=self.transform_probability)
