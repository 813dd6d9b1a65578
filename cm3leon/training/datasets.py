"""Training data for each stage: the shapes corpus (trained tokenizers + tokenized documents, cached), the
SFT task mixture, real image-text data (image folder, WebDataset shards), and :func:`build_data`.

Everything the trainer reads is an indexable example source (``len`` / ``[i] -> CM3Example``, the same
example for the same index), so :class:`cm3leon.data.PackedLoader` can split it across ranks and resume it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cm3leon._checks import check_int
from cm3leon.data.shapes import ShapesWorld
from cm3leon.data.tasks import TASKS, make_example
from cm3leon.tokenizer import (
    DocumentCodec,
    ImageTokenizer,
    ImageTokenizerConfig,
    TextTokenizer,
    Vocabulary,
    tokenize_images,
    train_image_tokenizer,
)
from cm3leon.tokenizer.train_text import shapes_corpus

from .config import TrainingConfig
from .data import TrainingData
from .runtime import Runtime

__all__ = ["ShapesCorpus", "TaskMixture", "build_data", "prepare_shapes_corpus", "sft_task_weights"]

TEXT_FILE, IMAGE_FILE, VOCAB_FILE = "text.json", "image_tokenizer.safetensors", "vocabulary.json"
MANIFEST = "corpus.json"
VAL_SCENE_OFFSET = 10_000_000  # validation scenes come after every training scene index


@dataclass
class ShapesCorpus:
    """Tokenizers of a corpus folder and, per task, tokenized documents (global ids)."""

    root: Path
    text_tokenizer: TextTokenizer
    image_tokenizer: ImageTokenizer
    vocabulary: Vocabulary

    @property
    def codec(self) -> DocumentCodec:
        grid = self.image_tokenizer.config.grid_size
        return DocumentCodec(self.text_tokenizer, self.vocabulary, image_shape=(grid, grid))

    @property
    def files(self) -> list[Path]:
        return [self.root / TEXT_FILE, self.root / IMAGE_FILE, self.root / VOCAB_FILE]

    def documents(self, task: str, n: int, *, start: int = 0, seed: int = 0, progress: bool = False
                  ) -> list[list[int]]:
        """Scenes ``start .. start + n - 1`` of the shapes world as ``task`` documents (``text_to_image`` is
        the pretraining ``caption <break> image``), tokenized; cached under ``root``."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        n, start = check_int("n", n, 0), check_int("start", start, 0)  # a negative n cached an empty list
        cache = self.root / f"documents-{task}-seed{seed}-{start}-{n}.pt"
        if cache.is_file():
            try:
                return torch.load(cache, weights_only=True)
            except Exception as err:  # torch's own message does not say which file
                raise ValueError(f"{cache}: damaged document cache ({type(err).__name__}); delete it to "
                                 "tokenize the documents again") from err
        world = ShapesWorld(image_size=self.image_tokenizer.config.image_size, seed=seed)
        codec, docs = self.codec, []
        with torch.inference_mode():
            for lo in tqdm(range(start, start + n, 256), desc=f"tokenizing {task}", disable=not progress):
                indices = range(lo, min(lo + 256, start + n))
                examples = tokenize_images([make_example(world, i, task).segments() for i in indices],
                                           self.image_tokenizer)
                docs.extend(codec.encode(segments) for segments in examples)
        tmp = cache.with_suffix(".part")
        torch.save(docs, tmp)
        tmp.rename(cache)
        return docs


def prepare_shapes_corpus(out_dir: str | PathLike, *, text_vocab_size: int = 1024, text_examples: int = 6000,
                          image_tokenizer: str = "demo", image_tokenizer_steps: int = 1500, seed: int = 0,
                          progress: bool = True) -> ShapesCorpus:
    """Tokenizers for the shapes world under ``out_dir``, trained once and loaded afterwards.

    Trains the byte-level BPE on ``text_examples`` shapes texts (every task family), the image tokenizer
    preset ``image_tokenizer`` for ``image_tokenizer_steps`` steps, and writes the :class:`Vocabulary`.
    ``corpus.json`` records these settings: a folder made with other settings raises ValueError instead of
    being silently reused. Documents are tokenized on demand by :meth:`ShapesCorpus.documents` (cached).
    """
    root = Path(out_dir)
    settings = {"text_vocab_size": text_vocab_size, "text_examples": text_examples,
                "image_tokenizer": image_tokenizer, "image_tokenizer_steps": image_tokenizer_steps,
                "seed": seed}
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{manifest}: not a readable corpus manifest ({err}); delete the folder to "
                             "prepare the corpus again") from err
        if found != settings:
            raise ValueError(f"{root} holds a shapes corpus made with {found}, not {settings}; use another "
                             "data.corpus_dir or delete the folder")
        return ShapesCorpus(root, TextTokenizer.load(root / TEXT_FILE),
                            ImageTokenizer.load(root / IMAGE_FILE), Vocabulary.load(root / VOCAB_FILE))
    root.mkdir(parents=True, exist_ok=True)
    text = TextTokenizer.train(shapes_corpus(text_examples, seed=seed), vocab_size=text_vocab_size)
    config = ImageTokenizerConfig.preset(image_tokenizer)
    world = ShapesWorld(image_size=config.image_size, seed=seed)
    trained = train_image_tokenizer(config, world, image_tokenizer_steps, seed=seed, progress=progress)
    image = trained.tokenizer.eval()
    vocabulary = Vocabulary(text.vocab_size, config.codebook_size)
    text.save(root / TEXT_FILE)
    image.save(root / IMAGE_FILE)
    vocabulary.save(root / VOCAB_FILE)
    manifest.write_text(json.dumps(settings, indent=1))  # last: its presence means the folder is complete
    return ShapesCorpus(root, text, image, vocabulary)


def sft_task_weights(counts: dict[str, int], ratio_min: float = 0.3, ratio_max: float = 3.0
                     ) -> dict[str, float]:
    """Sampling probability of each task: balanced (equal shares) but with each task's ratio to its natural
    share ``count / total`` clamped to ``[ratio_min, ratio_max]``, then renormalised (docs/recipe.md §6)."""
    if not counts or any(n < 1 for n in counts.values()):
        raise ValueError(f"counts must give every task at least one document, got {counts}")
    total = sum(counts.values())
    natural = {t: n / total for t, n in counts.items()}
    weights = {t: p * min(ratio_max, max(ratio_min, (1 / len(counts)) / p)) for t, p in natural.items()}
    norm = sum(weights.values())
    return {t: w / norm for t, w in weights.items()}


class TaskMixture:
    """An example source over several task sources, drawn in proportion to ``weights``.

    ``length`` examples per epoch; example ``i`` maps to (task, index) through a fixed table: each task gets
    ``round(weight * length)`` slots (largest remainders fill the rest), interleaved by a seeded shuffle,
    and cycles through its own source. ``set_epoch`` is passed to every task source.
    """

    def __init__(self, sources: dict[str, Any], weights: dict[str, float], *, length: int, seed: int) -> None:
        if set(sources) != set(weights):
            raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} must name the same "
                             "tasks")
        if length < len(sources):
            raise ValueError(f"length ({length}) must be >= the number of tasks ({len(sources)})")
        names = sorted(sources)
        empty = [t for t in names if len(sources[t]) == 0]
        if empty:
            raise ValueError(f"task sources {empty} are empty")
        share = np.array([weights[t] for t in names], dtype=np.float64)
        if not np.isfinite(share).all() or (share < 0).any() or share.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
        # normalised, so the table has exactly `length` slots whatever the weights sum to
        share = share / share.sum() * length
        slots = np.floor(share).astype(int)
        slots[np.argsort(-(share - slots), kind="stable")[: length - slots.sum()]] += 1
        table = np.concatenate([np.stack([np.full(n, k), np.arange(n)], 1) for k, n in enumerate(slots)])
        table = table[np.random.default_rng(seed).permutation(len(table))]
        self.sources, self.names, self.table = sources, names, table
        self.slots = dict(zip(names, slots.tolist()))

    def __len__(self) -> int:
        return len(self.table)

    def set_epoch(self, epoch: int) -> None:
        for source in self.sources.values():
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)

    def __getitem__(self, index: int):
        task, k = self.table[index]
        source = self.sources[self.names[task]]
        return source[int(k) % len(source)]


# ---- build the data of a run -----------------------------------------------------------------------------

def _corpus(config: TrainingConfig, runtime: Runtime) -> ShapesCorpus:
    """Rank 0 prepares (or loads) the corpus first; the other ranks then load what it wrote."""
    d = config.data
    kwargs = dict(text_vocab_size=d.text_vocab_size, text_examples=d.text_examples,
                  image_tokenizer=d.image_tokenizer, image_tokenizer_steps=d.image_tokenizer_steps,
                  seed=config.seed,
                  progress=config.logging.progress and runtime.is_main)
    corpus = prepare_shapes_corpus(d.corpus_dir, **kwargs) if runtime.is_main else None
    runtime.barrier()
    return corpus or prepare_shapes_corpus(d.corpus_dir, **kwargs)


def _documents(corpus: ShapesCorpus, config: TrainingConfig, runtime: Runtime, task: str, n: int, start: int
               ) -> list[list[int]]:
    if runtime.is_main:
        corpus.documents(task, n, start=start, seed=config.seed, progress=config.logging.progress)
    runtime.barrier()
    return corpus.documents(task, n, start=start, seed=config.seed)


def _cm3(documents: list[list[int]], vocabulary: Vocabulary, config: TrainingConfig, seed: int):
    from cm3leon.data.packing import CM3Source

    d = config.data
    return CM3Source(documents, vocabulary, seed=seed, max_seq_len=d.max_seq_len, poisson_rate=d.poisson_rate,
                     max_spans=d.max_spans, transform_probability=d.transform_probability)


def build_data(config: TrainingConfig, runtime: Runtime) -> TrainingData:
    """The sources of ``config.stage`` from ``config.data`` (see :class:`DataSection`)."""
    d = config.data
    corpus = _corpus(config, runtime)
    vocab = corpus.vocabulary
    if config.stage == "sft":
        per_task = max(1, d.documents // len(d.sft_tasks))
        sources = {t: _cm3(_documents(corpus, config, runtime, t, per_task, 0), vocab, config, config.seed)
                   for t in d.sft_tasks}
        counts = {t: len(s) for t, s in sources.items()}
        train = TaskMixture(sources, sft_task_weights(counts, d.sft_ratio_min, d.sft_ratio_max),
                            length=sum(counts.values()), seed=config.seed)
        # val_documents = 0 turns validation off, as in pretraining
        val_docs = [doc for t in d.sft_tasks for doc in _documents(
            corpus, config, runtime, t, max(1, d.val_documents // len(d.sft_tasks)), VAL_SCENE_OFFSET)] \
            if d.val_documents else []
    else:
        if d.source == "shapes":
            docs = _documents(corpus, config, runtime, "text_to_image", d.documents, 0)
        else:
            from .realdata import real_documents

            docs = real_documents(config, corpus, runtime)
        train = _retrieval_source(config, corpus) if d.memory_bank else _cm3(docs, vocab, config, config.seed)
        val_docs = _documents(corpus, config, runtime, "text_to_image", d.val_documents, VAL_SCENE_OFFSET) \
            if d.val_documents else []
    validation = _cm3(val_docs, vocab, config, config.seed + 1) if val_docs else None
    return TrainingData(vocab_size=len(vocab), train=train, validation=validation,
                        tokenizer_files=corpus.files)


def _retrieval_source(config: TrainingConfig, corpus: ShapesCorpus):
    """Retrieval-augmented CM3 examples: the memory bank's documents are the queries, each with the
    documents the retriever finds for it (the near-duplicate rule skips the query itself)."""
    from cm3leon.retrieval import DualEncoder, MemoryBank, RetrievalAugmentedSource, Retriever

    d = config.data
    bank = MemoryBank.load(d.memory_bank)
    encoder = DualEncoder.load(d.retrieval_encoder)
    retriever = Retriever(encoder, bank, corpus.text_tokenizer)
    return RetrievalAugmentedSource(list(bank.documents), retriever, corpus.vocabulary, seed=config.seed,
                                    max_seq_len=d.max_seq_len, poisson_rate=d.poisson_rate,
                                    max_spans=d.max_spans, keep=d.retrieved,
                                    transform_probability=d.transform_probability)
