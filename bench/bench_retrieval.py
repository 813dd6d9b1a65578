"""Memory-bank search throughput: FAISS exact (IndexFlatIP) and IVF through :class:`MemoryBank` vs a plain
torch ``matmul + topk`` over the same embeddings, at 10k and 1M documents, with IVF's recall@k against exact.

The embeddings are synthetic but clustered like real ones (unit vectors around 2,000 random centres), E = 64,
a batch of Q = 64 queries drawn the same way, k = 10. Queries/s = Q / median call time. The 1M bank takes
256 MB per copy and a few seconds of IVF training (on the first 100k vectors), so the whole file runs in a
couple of minutes on 2 cores.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from cm3leon.retrieval import MemoryBank, RetrievalDocument

DIM, QUERIES, K = 64, 64, 10
SIZES = {"10k": 10_000, "1M": 1_000_000}
NLIST = {"10k": 100, "1M": 2048}
NPROBE = 16
_DOC = RetrievalDocument("a document", None)  # the bank's payload does not matter for search speed


def _clustered(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(2000, DIM, generator=torch.Generator().manual_seed(0)), dim=-1)
    pick = torch.randint(0, centres.shape[0], (n,), generator=g)
    return F.normalize(centres[pick] + 0.6 * torch.randn(n, DIM, generator=g) / DIM ** 0.5, dim=-1)


@functools.cache
def _data(size: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _clustered(SIZES[size], seed=1), _clustered(QUERIES, seed=2)


@functools.cache
def _bank(size: str, kind: str) -> MemoryBank:
    emb, _ = _data(size)
    bank = MemoryBank(DIM, index=kind, nlist=NLIST[size], nprobe=NPROBE)
    first = min(len(emb), 100_000)  # an IVF bank trains on its first add
    bank.add([_DOC] * first, emb[:first])
    if first < len(emb):
        bank.add([_DOC] * (len(emb) - first), emb[first:])
    return bank


def _torch_topk(emb: torch.Tensor, queries: torch.Tensor):
    return (queries @ emb.T).topk(K, dim=1)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("impl", ["cm3leon", "torch-matmul-topk"])
def test_bank_search(benchmark, bench_record, size, kind, impl):
    emb, queries = _data(size)
    extra = {}
    if impl == "cm3leon":
        bank = _bank(size, kind)
        fn = functools.partial(bank.search, queries, K)
        if kind == "ivf":
            exact = _torch_topk(emb, queries).indices
            found = bank.search(queries, K)[1]
            hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact))
            extra["recall_at_10_vs_exact"] = round(hits / exact.numel(), 4)
    else:
        fn = functools.partial(_torch_topk, emb, queries)
    label = "FAISS IndexFlatIP" if kind == "flat" else f"FAISS IVF nlist={NLIST[size]} nprobe={NPROBE}"
    bench_record(benchmark, case=f"bank search N={size} E={DIM} Q={QUERIES} k={K} ({label})", impl=impl,
                 work=QUERIES, unit="queries/s", **extra)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
