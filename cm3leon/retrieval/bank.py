"""The memory bank: documents plus their embeddings in a FAISS index searched by maximum inner product.

Index kinds (``index=``):

- ``"flat"`` (default): exact search (``IndexFlatIP``).
- ``"ivf"``: inverted lists over a k-means coarse quantiser (``IndexIVFFlat``, inner product), trained on the
  first :meth:`MemoryBank.add`; ``nprobe`` lists are visited per query. For banks too big for exact search.
- ``"hnsw"``: a graph index (``IndexHNSWFlat``, inner product); no training.

With CUDA and the ``faiss-gpu`` package (``faiss.get_num_gpus() > 0``) flat and IVF indexes live on GPU 0;
the same package serves CPU indexes otherwise. Files are one checksummed ``.safetensors`` (see
:mod:`cm3leon.integrity`) holding the documents, the embeddings and the serialised FAISS index, written
atomically.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike

import numpy as np
import torch

from cm3leon.integrity import TensorFile, save_tensor_file

from .._checks import check_int
from .document import RetrievalDocument
from .embed import check_documents
from .serialize import documents_from_tensors, documents_to_tensors

__all__ = ["INDEX_KINDS", "MemoryBank"]

INDEX_KINDS = ("flat", "ivf", "hnsw")
_FORMAT = "cm3leon-memory-bank-v1"


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss is part of the retrieval extra
        raise ImportError("the memory bank needs FAISS: pip install 'cm3leon[retrieval]' (faiss-gpu or "
                          "faiss-cpu)") from err
    return faiss


def _check_matrix(name: str, x: object, dim: int) -> np.ndarray:
    """A finite float ``[N, dim]`` tensor -> contiguous float32 numpy (what FAISS takes)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape [N, {dim}] (the bank's dimension), got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(x.numpy())


class _ReadOnly(Sequence):
    """A read-only view of a list."""

    def __init__(self, items: list) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


class MemoryBank:
    """Documents and their embeddings, searchable by inner product.

    Args:
        dim: embedding dimension E.
        index: ``"flat"``, ``"ivf"`` or ``"hnsw"`` (see the module docs).
        nlist: IVF lists; None picks ``round(4 * sqrt(N))`` (at most ``N // 39``) at the first add.
        nprobe: IVF lists visited per query.
        hnsw_m / ef_search: HNSW graph degree and search breadth.
        use_gpu: None = GPU when ``faiss.get_num_gpus() > 0`` (flat and IVF); True requires one.
    """

    def __init__(self, dim: int, *, index: str = "flat", nlist: int | None = None, nprobe: int = 16,
                 hnsw_m: int = 32, ef_search: int = 64, use_gpu: bool | None = None) -> None:
        self.dim = check_int("dim", dim, 1)
        if index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
        self.kind = index
        self.nlist = None if nlist is None else check_int("nlist", nlist, 1)
        self.nprobe = check_int("nprobe", nprobe, 1)
        self.hnsw_m = check_int("hnsw_m", hnsw_m, 1)
        self.ef_search = check_int("ef_search", ef_search, 1)
        faiss = _faiss()
        gpus = faiss.get_num_gpus()
        if use_gpu and gpus == 0:
            raise ValueError("use_gpu=True but FAISS sees no GPU (needs CUDA and the faiss-gpu package)")
        self.on_gpu = bool(gpus > 0 if use_gpu is None else use_gpu) and index != "hnsw"
        self._documents: list[RetrievalDocument] = []
        self._chunks: list[torch.Tensor] = []
        self._index = None if index == "ivf" else self._place(self._new_index(None))

    # ---- FAISS index ---------------------------------------------------------------------------------
    def _new_index(self, nlist: int | None):
        faiss = _faiss()
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
            return index
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = self.nprobe
        return index

    def _place(self, index):
        if not self.on_gpu:
            return index
        faiss = _faiss()
        self._gpu_resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        if self.kind == "ivf":
            gpu_index.nprobe = self.nprobe
        return gpu_index

    def _cpu_index(self):
        return _faiss().index_gpu_to_cpu(self._index) if self.on_gpu else self._index

    # ---- contents --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._documents)

    @property
    def documents(self) -> Sequence[RetrievalDocument]:
        """The stored documents, in insertion order (``documents[i]`` is search index ``i``); a read-only
        view (no copy)."""
        return _ReadOnly(self._documents)

    @property
    def embeddings(self) -> torch.Tensor:
        """float32 ``[N, E]``: the stored embeddings, row ``i`` for document ``i``."""
        if len(self._chunks) != 1:
            self._chunks = [torch.cat(self._chunks) if self._chunks else torch.empty(0, self.dim)]
        return self._chunks[0]

    def add(self, documents: Sequence[RetrievalDocument], embeddings: torch.Tensor) -> None:
        """Appends documents with their embeddings ``[N, E]`` (e.g. from :func:`embed_documents`). The first
        add of an IVF bank trains its coarse quantiser on these embeddings."""
        documents = check_documents(documents, "documents")
        x = _check_matrix("embeddings", embeddings, self.dim)
        if x.shape[0] != len(documents):
            raise ValueError(f"embeddings has {x.shape[0]} rows but documents has {len(documents)} entries")
        if not documents:
            return
        if self._index is None:  # IVF: train on the first batch
            # FAISS wants ~39 training points per list
            nlist = self.nlist or max(1, min(x.shape[0] // 39, round(4 * x.shape[0] ** 0.5)))
            if x.shape[0] < nlist:
                raise ValueError(f"embeddings: an IVF bank with nlist={nlist} needs at least {nlist} embeddings "
                                 f"in its first add, got {x.shape[0]}")
            index = self._new_index(nlist)
            index.train(x)
            self.nlist = nlist
            self._index = self._place(index)
        self._index.add(x)
        self._documents.extend(documents)
        self._chunks.append(torch.from_numpy(x).clone())  # never alias the caller's tensor

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` highest inner products per query: ``(scores float32 [Q, k], indices int64 [Q, k])``, best
        first. Approximate indexes (IVF, HNSW) may find fewer than ``k``: missing slots hold index -1 and
        score -inf."""
        if not self._documents:
            raise ValueError("the memory bank is empty: add documents before searching")
        k = check_int("k", k, 1, len(self))
        q = _check_matrix("queries", queries, self.dim)
        scores, indices = self._index.search(q, k)
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).to(torch.int64)
        scores[indices < 0] = float("-inf")
        return scores, indices

    # ---- files -----------------------------------------------------------------------------------------
    def save(self, path: str | PathLike) -> None:
        """Writes the bank to one checksummed file (to a temporary name, then renamed over ``path``: a crash
        mid-save leaves the previous bank readable)."""
        tensors = documents_to_tensors(self._documents)
        tensors["embeddings"] = self.embeddings
        if self._index is not None:
            tensors["faiss_index"] = torch.from_numpy(_faiss().serialize_index(self._cpu_index()).copy())
        params = {"kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe, "hnsw_m": self.hnsw_m,
                  "ef_search": self.ef_search, "dim": self.dim}
        save_tensor_file(path, tensors, kind=_FORMAT, metadata={"params": json.dumps(params)})

    @classmethod
    def load(cls, path: str | PathLike, *, use_gpu: bool | None = None, verify: bool = True) -> MemoryBank:
        """Reads a bank written by :meth:`save`. Raises FileNotFoundError, or
        :class:`~cm3leon.integrity.CheckpointError` (a ValueError) naming ``path`` for a truncated, damaged
        (failing checksum; ``verify=False`` skips them), foreign or inconsistent file."""
        with TensorFile(path, kind=_FORMAT, verify=verify, what="memory bank file") as f:
            params = f.json_entry("params")
            tensors = f.tensors()
            try:
                bank = cls(params["dim"], index=params["kind"], nlist=params["nlist"], nprobe=params["nprobe"],
                           hnsw_m=params["hnsw_m"], ef_search=params["ef_search"], use_gpu=use_gpu)
                documents = documents_from_tensors(tensors)
                embeddings = tensors["embeddings"]
                if tuple(embeddings.shape) != (len(documents), bank.dim):
                    raise ValueError(f"{len(documents)} documents but embeddings of shape "
                                     f"{tuple(embeddings.shape)}")
                if "faiss_index" in tensors:
                    index = _faiss().deserialize_index(tensors["faiss_index"].numpy())
                    if index.ntotal != len(documents) or index.d != bank.dim:
                        raise ValueError(f"the index holds {index.ntotal} vectors of dimension {index.d}")
                    if bank.kind == "ivf":
                        index.nprobe = bank.nprobe
                    bank._index = bank._place(index)
            except (KeyError, ValueError, TypeError, RuntimeError) as err:
                raise f.error(f"inconsistent memory bank contents ({type(err).__name__}: {err})") from None
        bank._documents = documents
        bank._chunks = [embeddings]
        return bank
