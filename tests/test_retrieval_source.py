"""Retrieval-augmented training examples over shapes documents and an image folder."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cm3leon.data import ImageCaptionFolder, ShapesCaptions, export_shapes_folder
from cm3leon.retrieval import (
    MemoryBank,
    RetrievalAugmentedSource,
    RetrievalDocument,
    Retriever,
    caption_image_documents,
    embed_documents,
)
from cm3leon.tokenizer import DocumentCodec, ImageTokenizer, ImageTokenizerConfig, Vocabulary

from retrieval_fixtures import WORLD, FakeEncoder, shapes_documents, tiny_encoder, tokenizer


@dataclass(frozen=True)
class _Example:
    tokens: torch.Tensor
    loss_weights: torch.Tensor
    n_spans: int


def _fake_training_sequence(query_doc, retrieved_docs, vocabulary, *, generator, max_seq_len, poisson_rate=1.0,
                            max_spans=16):
    """The layout ``<eos> r1 <eos> ... <eos> query <eos>`` without masking; one draw from the generator."""
    eos = vocabulary.eos_id
    tokens = [eos]
    for doc in [*retrieved_docs, query_doc]:
        tokens += [*doc, eos]
    n_spans = int(torch.randint(0, 1000, (1,), generator=generator))
    return _Example(torch.tensor(tokens[:max_seq_len]), torch.ones(min(len(tokens), max_seq_len)), n_spans)


@pytest.fixture(autouse=True)
def fake_objective(monkeypatch):
    module = types.ModuleType("cm3leon.objective")
    module.training_sequence = _fake_training_sequence
    monkeypatch.setitem(sys.modules, "cm3leon.objective", module)


VOCAB = Vocabulary(text_size=300, image_codes=64)


def _source(seed: int = 0, n: int = 40) -> tuple[RetrievalAugmentedSource, list[RetrievalDocument]]:
    docs = shapes_documents(n)
    encoder = FakeEncoder()
    bank = MemoryBank(encoder.embed_dim)
    bank.add(docs, embed_documents(docs, encoder, tokenizer()))
    return RetrievalAugmentedSource(docs, Retriever(encoder, bank, tokenizer()), VOCAB, seed=seed,
                                    max_seq_len=4096), docs


def _split(tokens: torch.Tensor) -> list[list[int]]:
    parts, current = [], []
    for t in tokens.tolist()[1:]:
        if t == VOCAB.eos_id:
            parts.append(current)
            current = []
        else:
            current.append(t)
    return parts


def test_examples_are_query_after_three_retrieved_and_deterministic():
    source, docs = _source()
    again, _ = _source()
    assert len(source) == 40
    for i in (0, 7, 39):
        a, b, c = source[i], source[i], again[i]
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens) and a.n_spans == c.n_spans
        parts = _split(a.tokens)
        assert len(parts) == 4 and parts[-1] == docs[i].token_ids
        assert docs[i].token_ids not in parts[:3]  # the query is never its own context


def test_seed_epoch_and_index_change_the_draws():
    source, _ = _source(seed=0)
    other, _ = _source(seed=1)
    draws = {source[0].n_spans, source[1].n_spans, other[0].n_spans}
    source.set_epoch(1)
    draws.add(source[0].n_spans)
    assert len(draws) == 4


def test_bad_input():
    source, docs = _source(n=10)
    with pytest.raises(IndexError):
        source[10]
    assert torch.equal(source[np.int64(3)].tokens, source[3].tokens)
    with pytest.raises(TypeError, match="index must be an int"):
        source["0"]
    with pytest.raises(ValueError, match=r"queries\[1\] has no token_ids"):
        RetrievalAugmentedSource([docs[0], RetrievalDocument("x", None)], source.retriever, VOCAB, seed=0,
                                 max_seq_len=64)
    with pytest.raises(ValueError, match="keep must be a positive int"):
        RetrievalAugmentedSource(docs, source.retriever, VOCAB, seed=0, max_seq_len=64, keep=0)
    with pytest.raises(TypeError, match="retriever must be a Retriever"):
        RetrievalAugmentedSource(docs, object(), VOCAB, seed=0, max_seq_len=64)


@pytest.mark.parametrize("data", ["shapes", "folder"])
def test_from_pairs_over_shapes_and_an_image_folder(tmp_path, data):
    if data == "folder":
        export_shapes_folder(WORLD, tmp_path, 12)
        pairs = ImageCaptionFolder(tmp_path, image_size=16)
    else:
        pairs = ShapesCaptions(WORLD, 12)
    torch.manual_seed(0)
    image_tokenizer = ImageTokenizer(ImageTokenizerConfig.preset("tiny")).eval()
    vocab = Vocabulary(tokenizer().vocab_size, image_tokenizer.config.codebook_size)
    codec = DocumentCodec(tokenizer(), vocab, (4, 4))
    source = RetrievalAugmentedSource.from_pairs(pairs, tiny_encoder(), tokenizer(), codec, image_tokenizer,
                                                 seed=0, max_seq_len=4096, keep=2)
    image, text = pairs[3]
    caption, grid = codec.decode(source.queries[3].token_ids)
    assert caption == text and torch.equal(source.queries[3].image, image)
    assert torch.equal(grid, image_tokenizer.encode(image[None])[0])
    parts = _split(source[3].tokens)
    assert parts[-1] == source.queries[3].token_ids and 1 <= len(parts) - 1 <= 2


def test_caption_image_documents_checks_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        caption_image_documents(ShapesCaptions(WORLD, 2), None, None, batch_size=0)
