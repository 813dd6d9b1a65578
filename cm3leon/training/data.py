"""The trainer's data: example sources for each stage, and the packed loaders over them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainingConfig

__all__ = ["TrainingData", "make_loader"]


@dataclass
class TrainingData:
    """What the trainer consumes: indexable example sources (``len`` / ``[i]`` -> ``CM3Example``) for
    training and validation, the vocabulary size, and the tokenizer files to ship next to exported models."""

    vocab_size: int
    train: Any
    validation: Any | None = None
    tokenizer_files: list[Path] = field(default_factory=list)


def make_loader(source: Any, config: TrainingConfig, *, seed: int, rank: int, world_size: int) -> Any:
    """A :class:`ReshardableLoader` (a :class:`cm3leon.data.PackedLoader`) over ``source`` with the run's
    batch geometry."""
    from .resharding import ReshardableLoader

    data = config.data
    return ReshardableLoader(source, tokens_per_batch=data.tokens_per_batch, max_seq_len=data.max_seq_len,
                             seed=seed, rank=rank, world_size=world_size, num_workers=data.num_workers)

