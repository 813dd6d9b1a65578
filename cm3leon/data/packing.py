"""Packed, deterministic, exactly resumable training batches for the model's varlen (``cu_seqlens``) path.

:class:`PackedLoader` walks an indexable example source in a per-epoch random order, gives each rank its own
share of every epoch, and packs whole sequences greedily into batches of at most ``tokens_per_batch``
tokens. The batches depend only on ``(seed, rank, world_size)`` and the position in the stream, so
``state_dict()`` / ``load_state_dict()`` resume at exactly the next batch, with or without worker processes.
:class:`CM3Source` is the plain (retrieval-free) source: example ``i`` is the CM3 training sequence of
document ``i``, masked differently every epoch. Semantics and examples: docs/objective.md.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..objective import (CM3Example, check_max_seq_len, check_objective_args, check_probability,
                         training_sequence)
from ..tokenizer.vocabulary import Vocabulary
from cm3leon_kernels._checks import as_int

__all__ = ["CM3Source", "ExampleSource", "PackedBatch", "PackedLoader", "derive_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed (valid for ``torch.Generator.manual_seed``) from integer keys such as
    ``(seed, epoch, index)``: nearby keys give unrelated seeds, equal keys equal seeds, on every platform."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ _splitmix64(as_int("keys", k) & _MASK64))
    return h >> 1


def check_seed(seed: object) -> int:
    """Validates the seed of an example source or loader (a non-negative int); returns it as an int."""
    seed = as_int("seed", seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed


class ExampleSource(Protocol):
    """An indexable, deterministic example source: ``source[i]`` is the same :class:`CM3Example` every time
    (within an epoch, for sources with ``set_epoch(epoch)``, which the loader calls before each epoch)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> CM3Example: ...


@dataclass(frozen=True)
class PackedBatch:
    """Whole sequences packed back to back, ready for ``model(tokens, cu_seqlens=..., max_seqlen=...)``.

    Attributes:
        tokens: int64 ``[T]`` (``T <= tokens_per_batch``).
        targets: int64 ``[T]``: the next token inside the same sequence; 0 (``<pad>``) at each sequence's
            last position, whose weight is 0.
        loss_weights: float32 ``[T]``: weight of predicting ``targets[i]``, i.e. the example's weight of the
            next token; 0 at each sequence's last position.
        cu_seqlens: int32 ``[n + 1]`` cumulative sequence lengths, starting at 0.
        max_seqlen: longest sequence in the batch.
        n_sequences: n.
        padding: ``tokens_per_batch - T``, the unused budget (less than the next batch's first sequence).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_weights: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    n_sequences: int
    padding: int


class CM3Source:
    """Plain CM3 examples: ``source[i] = training_sequence(documents[i], [], ...)``.

    The masking of example ``i`` in epoch ``e`` is drawn from a generator seeded with
    ``derive_seed(seed, e, i)``: fixed for a given epoch, different across epochs (:meth:`set_epoch`).

    Args:
        documents: indexable documents (each a sequence of global ids, as ``DocumentCodec.encode`` gives);
            checked when accessed.
        vocabulary: the id space.
        seed: non-negative int.
        max_seq_len: longest sequence (>= 3); longer documents are cut as ``training_sequence`` describes.
        poisson_rate, max_spans: the span-count distribution, as in ``cm3_transform``.
        transform_probability: chance that a document is CM3-transformed at all (``training_sequence``).
    """

    def __init__(self, documents: Sequence[Sequence[int]], vocabulary: Vocabulary, *, seed: int,
                 max_seq_len: int, poisson_rate: float = 1.0, max_spans: int = 16,
                 transform_probability: float = 1.0) -> None:
        if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
            raise TypeError(f"documents must be a sequence of documents, got {type(documents).__name__}")
        if len(documents) == 0:
            raise ValueError("documents is empty")
        if not isinstance(vocabulary, Vocabulary):
            raise TypeError(f"vocabulary must be a Vocabulary, got {type(vocabulary).__name__}")
        self.max_seq_len = check_max_seq_len(max_seq_len)
        self.poisson_rate, self.max_spans = check_objective_args(poisson_rate, max_spans)
        self.transform_probability = check_probability("transform_probability", transform_probability)
        self.documents, self.vocabulary, self.seed = documents, vocabulary, check_seed(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.documents)

    def set_epoch(self, epoch: int) -> None:
        """Selects the masking of ``epoch`` (a non-negative int)."""
        epoch = as_int("epoch", epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __getitem__(self, index: int) -> CM3Example:
        index = as_int("index", index)
        if not 0 <= index < len(self.documents):
            raise IndexError(f"index {index} out of range for {len(self.documents)} documents")
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
        try:
            return training_sequence(self.documents[index], [], self.vocabulary, generator=generator,
                                     max_seq_len=self.max_seq_len, poisson_rate=self.poisson_rate,
                                     max_spans=self.max_spans, transform_probability=self.transform_probability)
        except (TypeError, ValueError) as e:
            raise type(e)(f"documents[{index}]: {e}") from e


class _EpochIndexed(torch.utils.data.Dataset):
    """``dataset[(epoch, position, index)] -> (epoch, position, index, source[index])``, calling
    ``source.set_epoch(epoch)`` first when the epoch changes (also inside each worker process's copy)."""

    def __init__(self, source: ExampleSource) -> None:
        self.source, self.epoch = source, None

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[int, int, int, Any]:
        epoch, position, index = key
        if epoch != self.epoch and hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)
        self.epoch = epoch
        return epoch, position, index, self.source[index]


def _unbatched(item: Any) -> Any:
    return item


class PackedLoader:
    """Endless stream of :class:`PackedBatch` over ``source``.

    Order: epoch ``e`` visits the source in the permutation drawn from ``derive_seed(seed, e)``; rank ``r``
    takes positions ``r, r + world_size, ...`` of it, so the ranks' shares are disjoint and together cover
    every example once per epoch. When ``len(source) % world_size != 0`` the first ``len % world_size``
    ranks get one example more per epoch (nothing is dropped); ranks run through epochs independently.

    Packing: whole sequences in order, greedily, while they fit in ``tokens_per_batch``; the first one that
    does not fit starts the next batch, so a batch's unused budget is smaller than that sequence.

    Resume: ``state_dict()`` records the position (epoch, index in this rank's share) of the first example
    of the next batch; ``load_state_dict()`` on a loader built with the same source, seed, rank and
    world_size continues with exactly that batch. Iterating again after leaving a loop continues the same
    way. One iterator at a time.

    Args:
        source: an :class:`ExampleSource` (``len``, ``[i] -> CM3Example``; optional ``set_epoch``).
        tokens_per_batch: token budget of a batch, >= ``max_seq_len``.
        max_seq_len: longest allowed example (>= 2); a longer one raises ValueError when met.
        seed: non-negative int.
        rank, world_size: this process's share (0 <= rank < world_size <= len(source)).
        num_workers: worker processes that compute examples (0: in this process); the batches are the same.
    """

    def __init__(self, source: ExampleSource, *, tokens_per_batch: int, max_seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0) -> None:
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise TypeError(f"source must support len() and indexing, got {type(source).__name__}")
        self.max_seq_len = as_int("max_seq_len", max_seq_len)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        self.tokens_per_batch = as_int("tokens_per_batch", tokens_per_batch)
        if self.tokens_per_batch < self.max_seq_len:
            raise ValueError(f"tokens_per_batch ({self.tokens_per_batch}) must be >= max_seq_len "
                             f"({self.max_seq_len}) so every sequence fits")
        self.world_size = as_int("world_size", world_size)
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        self.rank = as_int("rank", rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.num_workers = as_int("num_workers", num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        self.seed = check_seed(seed)
        if len(source) < self.world_size:
            raise ValueError(f"source has {len(source)} examples, fewer than world_size={self.world_size}")
        self.source = source
        self._epoch, self._index = 0, 0
        self._shard_cache: tuple[int, np.ndarray] | None = None

    # ---- order -----------------------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Source indices this rank visits in ``epoch``, in order."""
        if self._shard_cache is None or self._shard_cache[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(len(self.source), generator=generator).numpy()
            self._shard_cache = (epoch, order[self.rank::self.world_size])
        return self._shard_cache[1]

    def _keys(self, epoch: int, index: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, position in this rank's share, source index) from a position on, forever."""
        while True:
            shard = self.epoch_indices(epoch)
            for position in range(index, len(shard)):
                yield epoch, position, int(shard[position])
            epoch, index = epoch + 1, 0

    def _examples(self) -> Iterator[tuple[int, int, int, Any]]:
        keys = self._keys(self._epoch, self._index)
        dataset = _EpochIndexed(self.source)
        if self.num_workers == 0:
            return map(dataset.__getitem__, keys)
        # The sampler runs here and the workers compute examples; DataLoader returns them in sampler order.
        return iter(DataLoader(dataset, batch_size=None, sampler=keys, num_workers=self.num_workers,
                               collate_fn=_unbatched))

    # ---- packing ---------------------------------------------------------------------------------------
    def _check_example(self, example: Any, index: int) -> int:
        tokens, weights = getattr(example, "tokens", None), getattr(example, "loss_weights", None)
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.ndim != 1:
            raise TypeError(f"source[{index}].tokens must be a 1-D int64 tensor")
        if not isinstance(weights, torch.Tensor) or weights.shape != tokens.shape:
            raise TypeError(f"source[{index}].loss_weights must be a tensor shaped like its tokens")
        n = len(tokens)
        if not 1 <= n <= self.max_seq_len:
            raise ValueError(f"source[{index}] has {n} tokens; examples must hold 1..max_seq_len="
                             f"{self.max_seq_len} tokens")
        return n

    def _pack(self, examples: list[Any], lengths: list[int]) -> PackedBatch:
        tokens = torch.cat([ex.tokens for ex in examples])
        weights = torch.cat([ex.loss_weights for ex in examples]).to(torch.float32)
        cu = torch.zeros(len(examples) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        last = cu[1:].long() - 1
        targets = torch.empty_like(tokens)
        targets[:-1] = tokens[1:]
        targets[last] = 0
        target_weights = torch.empty_like(weights)
        target_weights[:-1] = weights[1:]
        target_weights[last] = 0.0
        return PackedBatch(tokens=tokens, targets=targets, loss_weights=target_weights, cu_seqlens=cu,
                           max_seqlen=max(lengths), n_sequences=len(examples),
                           padding=self.tokens_per_batch - len(tokens))

    def __iter__(self) -> Iterator[PackedBatch]:
        """Batches from the current position on, forever; the position advances as batches are taken."""
        examples: list[Any] = []
        lengths: list[int] = []
        used = 0
        for epoch, position, index, example in self._examples():
            n = self._check_example(example, index)
            if used + n > self.tokens_per_batch:
                self._epoch, self._index = epoch, position   # this example opens the next batch
                yield self._pack(examples, lengths)
                examples, lengths, used = [], [], 0
            examples.append(example)
            lengths.append(n)
            used += n

    # ---- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts, plus what fixes the order (checked by :meth:`load_state_dict`)."""
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "source_len": len(self.source)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continues at the batch that followed when ``state_dict`` was taken. ValueError naming
        ``state_dict`` if it is incomplete or was taken with another seed, rank, world_size or source size
        (the order would differ); ``tokens_per_batch`` may change (packing restarts at that example)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        mine = self.state_dict()
        missing = set(mine) - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {sorted(missing)}")
        for key in ("seed", "rank", "world_size", "source_len"):
            if state_dict[key] != mine[key]:
                raise ValueError(f"state_dict[{key!r}] is {state_dict[key]}, this loader has {mine[key]}")
        epoch = as_int("state_dict['epoch']", state_dict["epoch"])
        index = as_int("state_dict['index']", state_dict["index"])
        if epoch < 0 or not 0 <= index < len(self.epoch_indices(epoch)):
            raise ValueError(f"state_dict position (epoch {epoch}, index {index}) is outside this rank's "
                             "share")
        self._epoch, self._index = epoch, index
