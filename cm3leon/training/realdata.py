"""Real image-text data for pretraining: an image folder with ``captions.jsonl`` or WebDataset tar shards (the
layout img2dataset writes: ``key.jpg`` / ``key.png`` / ``key.webp`` beside ``key.txt`` or ``key.json`` with a
``"caption"``), tokenized into ``caption <break> image`` documents.

The data is read in shards (a tar file, or 1024 consecutive folder entries): rank ``r`` of ``w`` tokenizes
shards ``r, r + w, ...``, its loader workers decode different shards, and every finished shard is cached under
``<corpus_dir>/tokenized/<name>/``, so an interrupted preparation resumes at the first unfinished shard.
``<name>`` hashes the data's content (captions, and size and modification time of every image or local shard),
so data edited or replaced in place is tokenized again instead of read back stale.
All ranks then read every cached shard in shard order: the same document list everywhere, which the packed
loader splits across ranks.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cm3leon.data.folder import load_image, read_captions

from .config import TrainingConfig
from .runtime import Runtime

__all__ = ["expand_shards", "real_documents"]

FOLDER_SHARD = 1024
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str) -> list[str]:
    """``"data/shard-{000..003}.tar"`` -> the four paths (brace ranges keep their zero padding); several
    patterns may be joined with ``::``."""
    out: list[str] = []
    for part in pattern.split("::"):
        match = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if not match:
            out.append(part)
            continue
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        for i in range(int(lo), int(hi) + 1):
            out.extend(expand_shards(part[:match.start()] + str(i).zfill(width) + part[match.end():]))
    return out


def _caption(sample: dict[str, Any]) -> str:
    if "txt" in sample:
        return sample["txt"].decode("utf-8")
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"]
    raise ValueError(f"WebDataset sample {sample.get('__key__')!r} has no caption (.txt, or .json with "
                     "'caption')")


def _file_stamp(path: str | Path) -> str:
    """Resolved path, size and modification time of a local file (a URL stands for itself)."""
    file = Path(path)
    if not file.is_file():
        return str(path)
    stat = file.stat()
    return f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class _TarShards(Dataset):
    """Item ``i``: every ``(image uint8 [3, S, S], caption)`` of tar shard ``i`` (decoded in a worker)."""

    def __init__(self, urls: list[str], size: int) -> None:
        self.urls, self.size = urls, size

    def __len__(self) -> int:
        return len(self.urls)

    def fingerprint(self) -> str:
        return "\n".join(_file_stamp(url) for url in self.urls)

    def __getitem__(self, i: int) -> list[tuple[torch.Tensor, str]]:
        import webdataset as wds

        pairs = []
        for sample in wds.WebDataset(self.urls[i], shardshuffle=False, empty_check=False):
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None:
                raise ValueError(f"{self.urls[i]}: sample {sample.get('__key__')!r} has no image "
                                 f"({IMAGE_KEYS})")
            pairs.append((load_image(io.BytesIO(sample[key]), self.size), _caption(sample)))
        return pairs


class _FolderShards(Dataset):
    """Item ``i``: folder entries ``i * 1024 ..`` as ``(image, caption)`` pairs."""

    def __init__(self, root: str, size: int) -> None:
        self.items, self.size = read_captions(root), size

    def __len__(self) -> int:
        return (len(self.items) + FOLDER_SHARD - 1) // FOLDER_SHARD

    def fingerprint(self) -> str:
        return "\n".join(f"{_file_stamp(path)}\t{text}" for path, text in self.items)

    def __getitem__(self, i: int) -> list[tuple[torch.Tensor, str]]:
        chunk = self.items[i * FOLDER_SHARD:(i + 1) * FOLDER_SHARD]
        return [(load_image(path, self.size), text) for path, text in chunk]


def real_documents(config: TrainingConfig, corpus, runtime: Runtime) -> list[list[int]]:
    """Tokenized ``caption <break> image`` documents of ``config.data.path`` (see the module docstring)."""
    d = config.data
    size = corpus.image_tokenizer.config.image_size
    shards = _FolderShards(d.path, size) if d.source == "folder" else _TarShards(expand_shards(d.path), size)
    # keyed on the content, not on data.path: a folder that gained images or a relative shard pattern read
    # from another directory must not reuse shards tokenized from other data
    key = hashlib.sha256(f"{d.source}:{shards.fingerprint()}".encode())
    cache = Path(d.corpus_dir) / "tokenized" / key.hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(runtime.rank, len(shards), runtime.world_size)
            if not (cache / f"{i:06d}.pt").is_file()]
    codec = corpus.codec
    loader = DataLoader(torch.utils.data.Subset(shards, mine), batch_size=None, num_workers=d.num_workers,
                        collate_fn=lambda x: x)
    bar = tqdm(zip(mine, loader), total=len(mine), desc=f"tokenizing {d.source} shards",
               disable=not (config.logging.progress and runtime.is_main))
    with torch.inference_mode():
        for index, pairs in bar:
            docs = []
            if pairs:
                grids = corpus.image_tokenizer.encode(torch.stack([image for image, _ in pairs]))
                docs = [codec.encode_caption_image(text, grid) for (_, text), grid in zip(pairs, grids)]
            tmp = cache / f"{index:06d}.part"
            torch.save(docs, tmp)
            tmp.rename(cache / f"{index:06d}.pt")  # a shard counts as done only once complete
    runtime.barrier()
    documents = [doc for i in range(len(shards))
                 for doc in torch.load(cache / f"{i:06d}.pt", weights_only=True)]
    if not documents:
        raise ValueError(f"data.path={d.path!r} holds no image-caption pairs")
    return documents
