"""File helpers shared by the encoder checkpoints and the memory bank: atomic writes and checked reads."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

import torch

__all__ = ["atomic_path", "read_safetensors"]


@contextmanager
def atomic_path(path: str | PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is flushed to disk and renamed over ``path``
    (an atomic replace), so a crash mid-write leaves the previous file intact. On failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_safetensors(path: str | PathLike, *, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Reads all tensors and the metadata of a ``.safetensors`` file; a missing file raises
    FileNotFoundError, a truncated or damaged one ValueError naming the file and ``what`` it should be."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} is truncated or damaged, not a readable {what}: {err}") from None
    return metadata, tensors
