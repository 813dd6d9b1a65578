"""The retrieval strategy: relevance, modality preference, the 0.9 rule, no duplicates, query dropout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cm3leon.retrieval import MemoryBank, RetrievalDocument, Retriever, embed_documents

from retrieval_fixtures import FakeEncoder, shapes_documents, tokenizer


class LookupEncoder:
    """Embeddings chosen by the test: captions by their text, images by their first pixel value."""

    embed_dim = 4

    def __init__(self, vectors: dict[str, torch.Tensor]) -> None:
        self.vectors = vectors  # text -> vector; images use the text f"img{pixel}"

    def encode_texts(self, text_ids):
        return torch.stack([self.vectors[tokenizer().decode(ids)] for ids in text_ids])

    def encode_images(self, images, *, drop=0.0, generator=None):
        assert drop == 0.0
        return torch.stack([self.vectors[f"img{int(im[0, 0, 0])}"] for im in images])


def _doc(text: str | None, pixel: int | None) -> RetrievalDocument:
    image = None if pixel is None else torch.full((3, 4, 4), pixel, dtype=torch.uint8)
    return RetrievalDocument(text, image, [1])


def _scenario():
    e = torch.eye(4)
    unit = lambda v: F.normalize(v, dim=0)  # noqa: E731
    vecs = {  # each multimodal document's caption and image share one vector, so its embedding is that vector
        "query": e[0], "far": unit(e[0] + 0.455 * e[2]), "near": unit(e[0] + 0.512 * e[2]),
        "alpha": unit(e[0] + 0.8 * e[1]), "alpha twin": unit(e[0] + 0.75 * e[1]), "other": unit(e[0] + 1.5 * e[3]),
        "caption only": unit(e[0] - e[2]),
    }
    pixels = {"query": 0, "far": 1, "near": 2, "alpha": 3, "alpha twin": 4, "other": 5}
    vecs.update({f"img{p}": vecs[t] for t, p in pixels.items()})
    query = _doc("query", 0)
    docs = {name: _doc(name, pixels.get(name)) for name in vecs if not name.startswith("img")}
    docs["query copy"] = _doc("query", 0)
    encoder = LookupEncoder(vecs)
    bank = MemoryBank(4)
    bank.add(list(docs.values()), embed_documents(list(docs.values()), encoder, tokenizer()))
    names = {id(d): n for n, d in docs.items()}
    return Retriever(encoder, bank, tokenizer()), query, docs, names


@pytest.mark.parametrize("by", ["text", "image", "both"])
def test_near_duplicates_skipped_multimodal_first(by):
    retriever, query, docs, names = _scenario()
    got = [names[id(d)] for d in retriever.retrieve([query], 4, by=by)[0]]
    # query / query copy score 1.0 and "far" 0.91: skipped; "alpha" is a near-copy (cos > 0.9) of "alpha twin",
    # taken first (0.800 > 0.781); the caption-only document (0.707) comes after every multimodal one.
    assert got == ["near", "alpha twin", "other", "caption only"]
    assert [names[id(d)] for d in retriever.retrieve([docs["query"]], 2, by=by)[0]] == ["near", "alpha twin"]


def test_threshold_is_configurable_and_taken_documents_are_skipped():
    retriever, query, docs, names = _scenario()
    loose = Retriever(retriever.encoder, retriever.bank, tokenizer(), max_score=1.0)
    got = [names[id(d)] for d in loose.retrieve([query], 3)[0]]
    assert set(got[:2]) == {"query", "query copy"} and got[2] == "far"  # max_score=1: nothing is above it
    index = {id(d): i for i, d in enumerate(retriever.bank.documents)}
    taken = [[index[id(docs["near"])]]]
    got = retriever.retrieve_indices([query], 2, taken=taken)[0]
    assert [names[id(retriever.bank.documents[j])] for j in got] == ["alpha twin", "other"]


def _fake_setup(n: int = 60):
    docs = shapes_documents(n)
    encoder = FakeEncoder()
    bank = MemoryBank(encoder.embed_dim)
    embeddings = embed_documents(docs, encoder, tokenizer())
    bank.add(docs, embeddings)
    return Retriever(encoder, bank, tokenizer()), docs, F.normalize(embeddings, dim=-1)


def test_rules_hold_on_shapes_documents_for_training():
    retriever, docs, emb = _fake_setup()
    index = {id(d): i for i, d in enumerate(docs)}
    gen = torch.Generator().manual_seed(0)
    results = retriever.retrieve_for_training(docs[:20], generator=gen)
    for q, found in enumerate(results):
        assert len(found) == 3
        rows = [index[id(d)] for d in found]
        assert q not in rows and len(set(rows)) == 3
        assert (emb[rows] @ emb[q] <= 0.9).all()          # nothing near the query itself
        sims = emb[rows] @ emb[rows].T
        assert (sims[~torch.eye(3, dtype=torch.bool)] <= 0.9).all()  # no near-duplicates among them


def test_training_retrieval_is_deterministic_for_a_seed():
    retriever, docs, _ = _fake_setup()
    calls = retriever.encoder.text_calls

    def run(seed):
        calls.clear()
        found = retriever.retrieve_for_training(docs[:10], generator=torch.Generator().manual_seed(seed))
        return [[id(d) for d in r] for r in found], [list(c) for c in calls]

    (found_a, calls_a), (found_b, calls_b), (_, calls_c) = run(5), run(5), run(6)
    assert found_a == found_b and calls_a == calls_b
    assert calls_a != calls_c  # another seed drops other tokens


def test_query_dropout_drops_the_stated_fraction_only_when_training():
    retriever, docs, _ = _fake_setup(30)
    enc = retriever.encoder
    query = docs[:4]
    ids = [tokenizer().encode(d.text) for d in query]
    enc.text_calls.clear(), enc.image_calls.clear()
    retriever.retrieve(query, 2, by="both")
    assert enc.text_calls == [ids] and enc.image_calls == [(4, 0.0, 16)]
    enc.text_calls.clear(), enc.image_calls.clear()
    retriever.retrieve(query, 2, by="both", generator=torch.Generator().manual_seed(0))
    full, dropped = enc.text_calls
    assert full == ids
    for whole, kept in zip(ids, dropped):
        assert len(kept) == len(whole) - round(0.2 * len(whole))
        it = iter(whole)
        assert all(t in it for t in kept)  # a subsequence: order kept
    assert enc.image_calls == [(4, 0.0, 16), (4, 0.2, 16 - round(0.2 * 16))]
    first = enc.text_calls[1]
    enc.text_calls.clear()
    retriever.retrieve(query, 2, by="text", generator=torch.Generator().manual_seed(0))
    assert enc.text_calls[1] == first  # same seed, same dropped tokens


def test_inference_counts_and_bad_input():
    retriever, docs, _ = _fake_setup(10)
    assert retriever.retrieve(docs[:2], 0) == [[], []]
    assert all(len(r) == 2 for r in retriever.retrieve(docs[:2], 2))
    text_only = RetrievalDocument("a red circle in the center", None)
    image_only = RetrievalDocument(None, docs[0].image)
    assert len(retriever.retrieve([text_only], 1, by="text")[0]) == 1
    with pytest.raises(ValueError, match=r"k \(11\) is larger than the bank"):
        retriever.retrieve(docs[:1], 11)
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        retriever.retrieve(docs[:1], -1)
    with pytest.raises(ValueError, match=r"queries\[1\] has no text"):
        retriever.retrieve([docs[0], image_only], 1, by="text")
    with pytest.raises(ValueError, match=r"queries\[0\] has no image"):
        retriever.retrieve([text_only], 1, by="image")
    with pytest.raises(ValueError, match="by must be one of"):
        retriever.retrieve(docs[:1], 1, by="caption")
    with pytest.raises(TypeError, match=r"queries\[0\] must be a RetrievalDocument"):
        retriever.retrieve(["a red circle"], 1)
    with pytest.raises(TypeError, match="generator must be"):
        retriever.retrieve(docs[:1], 1, generator=0)
    empty = Retriever(retriever.encoder, MemoryBank(16), tokenizer())
    with pytest.raises(ValueError, match="bank is empty"):
        empty.retrieve(docs[:1], 1)
    with pytest.raises(ValueError, match="embed_dim"):
        Retriever(retriever.encoder, MemoryBank(8), tokenizer())
    with pytest.raises(ValueError, match="query_dropout"):
        Retriever(retriever.encoder, retriever.bank, tokenizer(), query_dropout=1.5)
    with pytest.raises(TypeError, match="query_dropout"):
        Retriever(retriever.encoder, retriever.bank, tokenizer(), query_dropout="0.5")
    # numpy floats are numbers too (they used to be refused)
    assert Retriever(retriever.encoder, retriever.bank, tokenizer(), query_dropout=np.float32(0.25)).query_dropout \
        == 0.25
