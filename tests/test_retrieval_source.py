"""Retrieval-augmented training examples over shapes documents and an image folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cm3leon.data import ImageCaptionFolder, PackedLoader, ShapesCaptions, export_shapes_folder
from cm3leon.objective import cm3_restore
from cm3leon.retrieval import (
    MemoryBank,
    RetrievalAugmentedSource,
    RetrievalDocument,
    Retriever,
    caption_image_documents,
    embed_documents,
)
from cm3leon.tokenizer import DocumentCodec, ImageTokenizer, ImageTokenizerConfig, Vocabulary

from retrieval_fixtures import WORLD, FakeEncoder, shapes_documents, tiny_encoder, tokenizer, vocabulary


def _source(seed: int = 0, n: int = 40) -> tuple[RetrievalAugmentedSource, list[RetrievalDocument]]:
    docs = shapes_documents(n)
    encoder = FakeEncoder()
    bank = MemoryBank(encoder.embed_dim)
    bank.add(docs, embed_documents(docs, encoder, tokenizer()))
    return RetrievalAugmentedSource(docs, Retriever(encoder, bank, tokenizer()), vocabulary(), seed=seed,
                                    max_seq_len=4096), docs


def _documents(tokens: torch.Tensor, vocab: Vocabulary) -> list[list[int]]:
    """The documents of ``<eos> T(r1) <eos> ... T(query) <eos>``, each restored from its CM3 transform."""
    parts, current = [], []
    assert tokens[0] == vocab.eos_id and tokens[-1] == vocab.eos_id
    for t in tokens.tolist()[1:]:
        if t == vocab.eos_id:
            parts.append(cm3_restore(current, vocab))
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
        parts = _documents(a.tokens, vocabulary())
        assert len(parts) == 4 and parts[-1] == docs[i].token_ids
        assert docs[i].token_ids not in parts[:3]  # the query is never its own context


def test_packed_loader_takes_the_source():
    source, _ = _source(n=12)
    batch = next(iter(PackedLoader(source, tokens_per_batch=512, max_seq_len=256, seed=0)))
    assert batch.n_sequences >= 1 and batch.tokens.shape == batch.targets.shape
    assert int(batch.cu_seqlens[-1]) == batch.tokens.shape[0]


def test_seed_epoch_and_index_change_the_draws():
    source, _ = _source(seed=0)
    other, _ = _source(seed=1)
    seeds = {source.generator(0).initial_seed(), source.generator(1).initial_seed(),
             other.generator(0).initial_seed()}
    examples = set()
    for epoch in range(4):
        source.set_epoch(epoch)
        seeds.add(source.generator(0).initial_seed())
        examples.add(tuple(source[0].tokens.tolist()))
    assert len(seeds) == 6 and len(examples) > 1  # the masking (and dropout) differ between epochs


def test_bad_input():
    source, docs = _source(n=10)
    with pytest.raises(IndexError):
        source[10]
    assert torch.equal(source[np.int64(3)].tokens, source[3].tokens)
    with pytest.raises(TypeError, match="index must be an int"):
        source["0"]
    with pytest.raises(ValueError, match=r"queries\[1\] has no token_ids"):
        RetrievalAugmentedSource([docs[0], RetrievalDocument("x", None)], source.retriever, vocabulary(),
                                 seed=0, max_seq_len=64)
    with pytest.raises(ValueError, match="keep must be a positive int"):
        RetrievalAugmentedSource(docs, source.retriever, vocabulary(), seed=0, max_seq_len=64, keep=0)
    with pytest.raises(TypeError, match="retriever must be a Retriever"):
        RetrievalAugmentedSource(docs, object(), vocabulary(), seed=0, max_seq_len=64)
    # these used to pass the constructor and fail only when the first example was read
    with pytest.raises(TypeError, match="vocabulary must be a Vocabulary"):
        RetrievalAugmentedSource(docs, source.retriever, None, seed=0, max_seq_len=64)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        RetrievalAugmentedSource(docs, source.retriever, vocabulary(), seed=-1, max_seq_len=64)
    with pytest.raises(ValueError, match="max_seq_len must be >= 3"):
        RetrievalAugmentedSource(docs, source.retriever, vocabulary(), seed=0, max_seq_len=2)


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
    parts = _documents(source[3].tokens, vocab)
    assert parts[-1] == source.queries[3].token_ids and 1 <= len(parts) - 1 <= 2


def test_caption_image_documents_checks_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        caption_image_documents(ShapesCaptions(WORLD, 2), None, None, batch_size=0)
