"""CM3Leon's retrieval strategy over a :class:`MemoryBank`.

For each query:

1. **Query dropout** (training only: when a ``generator`` is given): 20% of the query caption's text tokens
   and of its image's patch tokens are dropped before embedding, drawn from the generator.
2. **Relevance**: the bank is searched by inner product with the query embedding (caption, image, or their
   average for ``by="both"``); the top ``oversample * k`` candidates are considered.
3. **Modality**: candidates holding both an image and a caption come first, each group by score.
4. **Diversity**: a candidate is skipped if it scores above ``max_score`` (0.9) against the query, either by
   the search score or by the cosine between its document embedding and the query's own (undropped)
   document embedding, which catches the query itself and its near-copies, or if its cosine to a document
   already taken for this query is above ``max_score`` (no duplicates).

If fewer than ``k`` candidates survive, the search widens (4x) up to the whole bank; a bank without ``k``
acceptable documents gives fewer. Training pairs (:meth:`Retriever.retrieve_for_training`) take two documents
by the caption and two by the image and keep three; at inference ask for 0, 1 or 2.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._checks import check_int
from .bank import MemoryBank
from .document import RetrievalDocument
from .dropout import check_fraction, drop_tokens
from .embed import TextTokenizerLike, check_documents, image_groups
from .encoder import ImageTextEncoder

__all__ = ["QUERY_MODES", "Retriever"]

QUERY_MODES = ("text", "image", "both")


class Retriever:
    """Retrieves documents for queries from ``bank`` with the CM3Leon strategy (module docs).

    Args:
        encoder: the encoder the bank was embedded with (:class:`DualEncoder` or an adapter).
        bank: the memory bank.
        text_tokenizer: the tokenizer of ``encoder``'s text tower.
        max_score: near-duplicate threshold (0.9).
        query_dropout: fraction of query tokens / patches dropped at training time (0.2).
        oversample: candidates considered per wanted document before widening.
    """

    def __init__(self, encoder: ImageTextEncoder, bank: MemoryBank, text_tokenizer: TextTokenizerLike, *,
                 max_score: float = 0.9, query_dropout: float = 0.2, oversample: int = 4) -> None:
        if not isinstance(bank, MemoryBank):
            raise TypeError(f"bank must be a MemoryBank, got {type(bank).__name__}")
        if encoder.embed_dim != bank.dim:
            raise ValueError(f"encoder.embed_dim ({encoder.embed_dim}) != bank.dim ({bank.dim})")
        if isinstance(max_score, bool) or not isinstance(max_score, (int, float)) or not -1.0 < max_score <= 1.0:
            raise ValueError(f"max_score must be a number in (-1, 1], got {max_score!r}")
        check_int("oversample", oversample, 1)
        self.encoder, self.bank, self.text_tokenizer = encoder, bank, text_tokenizer
        self.max_score = float(max_score)
        self.query_dropout = check_fraction(query_dropout, "query_dropout")
        self.oversample = oversample

    # ---- public API ------------------------------------------------------------------------------------
    def retrieve(self, queries: Sequence[RetrievalDocument], k: int, *, by: str = "text",
                 generator: torch.Generator | None = None) -> list[list[RetrievalDocument]]:
        """Up to ``k`` documents per query, best first. ``generator`` turns on query dropout (training)."""
        return [[self.bank.documents[j] for j in row] for row in self.retrieve_indices(queries, k, by=by,
                                                                                      generator=generator)]

    def retrieve_indices(self, queries: Sequence[RetrievalDocument], k: int, *, by: str = "text",
                         generator: torch.Generator | None = None,
                         taken: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
        """As :meth:`retrieve`, returning bank indices; ``taken[i]`` are indices already chosen for query
        ``i`` (they and their near-duplicates are skipped)."""
        queries = self._check(queries, k, by, generator)
        if k == 0 or not queries:
            return [[] for _ in queries]
        if taken is not None and len(taken) != len(queries):
            raise ValueError(f"taken must have one entry per query ({len(queries)}), got {len(taken)}")
        search, reference = self._query_embeddings(queries, by, generator)
        return [self._select(search[i], reference[i], k, list(taken[i]) if taken else [])
                for i in range(len(queries))]

    def retrieve_for_training(self, queries: Sequence[RetrievalDocument], *, generator: torch.Generator,
                              per_modality: int = 2, keep: int = 3) -> list[list[RetrievalDocument]]:
        """Training-time retrieval: ``per_modality`` documents by the caption, then ``per_modality`` by the
        image (never one already taken), interleaved by rank and cut to ``keep``. A query with one modality
        takes ``keep`` by that one. Query dropout is on (``generator`` is required)."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        for name, value in (("per_modality", per_modality), ("keep", keep)):
            check_int(name, value, 1)
        queries = check_documents(queries, "queries")
        out = []
        for query in queries:
            modes = [m for m, has in (("text", query.text), ("image", query.image)) if has is not None]
            k = min(len(self.bank), per_modality if len(modes) > 1 else keep)
            picks: list[list[int]] = []
            for mode in modes:
                taken = [j for p in picks for j in p]
                picks.extend(self.retrieve_indices([query], k, by=mode, generator=generator, taken=[taken]))
            ranked = [p[r] for r in range(k) for p in picks if r < len(p)]
            out.append([self.bank.documents[j] for j in ranked[:keep]])
        return out

    # ---- internals -------------------------------------------------------------------------------------
    def _check(self, queries: object, k: object, by: object, generator: object) -> list[RetrievalDocument]:
        queries = check_documents(queries, "queries")
        k = check_int("k", k, 0)
        if k and not len(self.bank):
            raise ValueError("bank is empty: add documents before retrieving")
        if k > len(self.bank):
            raise ValueError(f"k ({k}) is larger than the bank ({len(self.bank)} documents)")
        if by not in QUERY_MODES:
            raise ValueError(f"by must be one of {QUERY_MODES}, got {by!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        for i, q in enumerate(queries):
            if by == "text" and q.text is None:
                raise ValueError(f"queries[{i}] has no text to search by (by='text')")
            if by == "image" and q.image is None:
                raise ValueError(f"queries[{i}] has no image to search by (by='image')")
        return queries

    @torch.inference_mode()
    def _query_embeddings(self, queries: list[RetrievalDocument], by: str, generator: torch.Generator | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(search embeddings [Q, E] with dropout if training, normalised undropped document embeddings)."""
        n, dim = len(queries), self.encoder.embed_dim
        full, dropped = torch.zeros(n, dim), torch.zeros(n, dim)
        used = torch.zeros(n, 1)
        drop = self.query_dropout if generator is not None else 0.0
        with_text = [i for i, q in enumerate(queries) if q.text is not None]
        if with_text:
            ids = [self.text_tokenizer.encode(queries[i].text) for i in with_text]
            emb = self.encoder.encode_texts(ids).float().cpu()
            full[with_text] += emb
            if by != "image":
                if drop:
                    emb = self.encoder.encode_texts([drop_tokens(x, drop, generator) for x in ids]).float().cpu()
                dropped[with_text] += emb
                used[with_text] += 1
        for rows in image_groups(queries, range(n)):
            images = torch.stack([queries[i].image for i in rows])
            emb = self.encoder.encode_images(images).float().cpu()
            full[rows] += emb
            if by != "text":
                if drop:
                    emb = self.encoder.encode_images(images, drop=drop, generator=generator).float().cpu()
                dropped[rows] += emb
                used[rows] += 1
        return dropped / used, F.normalize(full, dim=-1)

    def _select(self, query: torch.Tensor, reference: torch.Tensor, k: int, taken: list[int]) -> list[int]:
        n_bank = len(self.bank)
        n_cand = min(n_bank, max(self.oversample * k, k + 8))
        while True:
            scores, indices = self.bank.search(query[None], n_cand)
            valid = indices[0] >= 0
            scores, indices = scores[0][valid], indices[0][valid]
            docs = self.bank.documents
            multimodal = [docs[j].multimodal for j in indices.tolist()]
            order = sorted(range(len(indices)), key=lambda r: (not multimodal[r], -float(scores[r]), r))
            cand = F.normalize(self.bank.embeddings[indices], dim=-1)
            chosen = set(taken)
            chosen_vecs = [F.normalize(self.bank.embeddings[j], dim=-1) for j in taken]
            picked: list[int] = []
            for r in order:
                if len(picked) == k:
                    break
                if float(scores[r]) > self.max_score or float(cand[r] @ reference) > self.max_score:
                    continue  # a near-duplicate of the query (or the query itself)
                if int(indices[r]) in chosen or any(float(cand[r] @ v) > self.max_score for v in chosen_vecs):
                    continue  # a document already taken, or a near-duplicate of one
                picked.append(int(indices[r]))
                chosen.add(picked[-1])
                chosen_vecs.append(cand[r])
            if len(picked) == k or n_cand == n_bank:
                return picked
            n_cand = min(n_bank, 4 * n_cand)
