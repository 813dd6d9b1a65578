"""The generation checkpoint directory: a model next to the tokenizers it was trained with.

Layout (file names are :data:`MODEL_FILE` etc.)::

    DIR/
      model.safetensors              cm3leon.save / cm3leon.load (weights + config)
      vocabulary.json                Vocabulary.save
      text.json                      TextTokenizer.save
      image_tokenizer.safetensors    ImageTokenizer.save
      retrieval/                     optional (needs cm3leon.retrieval):
        dual_encoder.safetensors     DualEncoder.save: re-ranks samples (ImageTextScorer)
        memory_bank.safetensors      MemoryBank.save: retrieval-augmented prompts (Retriever, with the encoder)

The dual encoder's text tower reads the bundle's text tokenizer.

:func:`save_bundle` writes it; :func:`load_bundle` reads it and checks that the pieces agree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load, save
from ..model import CM3Leon
from ..tokenizer import DocumentCodec, ImageTokenizer, TextTokenizer, Vocabulary
from .core import Pipeline

__all__ = ["DUAL_ENCODER_FILE", "IMAGE_TOKENIZER_FILE", "MEMORY_BANK_FILE", "MODEL_FILE", "RETRIEVAL_DIR",
           "TEXT_TOKENIZER_FILE", "VOCABULARY_FILE", "Bundle", "load_bundle", "save_bundle"]

MODEL_FILE = "model.safetensors"
VOCABULARY_FILE = "vocabulary.json"
TEXT_TOKENIZER_FILE = "text.json"
IMAGE_TOKENIZER_FILE = "image_tokenizer.safetensors"
RETRIEVAL_DIR = "retrieval"
DUAL_ENCODER_FILE = "dual_encoder.safetensors"
MEMORY_BANK_FILE = "memory_bank.safetensors"


@dataclass
class Bundle:
    """Everything generation needs: the model, its codec (text tokenizer + vocabulary + image grid), the image
    tokenizer, and optionally a retriever and an image-text scorer."""

    model: CM3Leon
    codec: DocumentCodec
    image_tokenizer: ImageTokenizer
    retriever: Any = None
    scorer: Any = None

    def pipeline(self, **kwargs: Any) -> Pipeline:
        """A :class:`Pipeline` over this bundle (``kwargs``: ``decode_step``, ``progress``)."""
        return Pipeline(self.model, self.codec, self.image_tokenizer, retriever=self.retriever,
                        scorer=self.scorer, **kwargs)


def save_bundle(directory: str | os.PathLike, model: CM3Leon, codec: DocumentCodec,
                image_tokenizer: ImageTokenizer) -> Path:
    """Writes the model and its tokenizers in the layout :func:`load_bundle` reads; returns the directory."""
    Pipeline(model, codec, image_tokenizer)  # the same consistency checks as loading
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    save(model, root / MODEL_FILE)
    codec.vocabulary.save(root / VOCABULARY_FILE)
    codec.text_tokenizer.save(root / TEXT_TOKENIZER_FILE)
    image_tokenizer.save(root / IMAGE_TOKENIZER_FILE)
    return root


def load_bundle(directory: str | os.PathLike, *, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> Bundle:
    """Reads a checkpoint directory (see the module docstring) onto ``device``, the model cast to ``dtype``
    and its projections fused for inference (:meth:`CM3Leon.fuse_projections`; float32 models on the CPU also
    get the transposed matrix layout).

    Raises:
        FileNotFoundError: the directory or one of its required files is missing (the message names it).
        ImportError: the directory has retrieval files but ``cm3leon.retrieval`` (FAISS) cannot be imported.
        ValueError: a file is not in its format, or the pieces disagree (vocabulary vs model vs tokenizers).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(root)!r} does not exist")
    image_file = root / IMAGE_TOKENIZER_FILE
    missing = [path.name for path in (root / MODEL_FILE, root / VOCABULARY_FILE, root / TEXT_TOKENIZER_FILE,
                                      image_file) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint directory {str(root)!r} lacks {', '.join(missing)}")
    vocabulary = Vocabulary.load(root / VOCABULARY_FILE)
    image_tokenizer = ImageTokenizer.load(image_file, map_location=device)
    grid = image_tokenizer.config.grid_size
    try:
        codec = DocumentCodec(TextTokenizer.load(root / TEXT_TOKENIZER_FILE), vocabulary, (grid, grid))
    except ValueError as err:  # name the files: the codec's own message only names its arguments
        raise ValueError(f"{root / TEXT_TOKENIZER_FILE} does not match {root / VOCABULARY_FILE}: "
                         f"{err}") from err
    model = load(root / MODEL_FILE, device=device, dtype=dtype).eval()
    weight = model.embed.weight
    # float32 decoding on a CPU runs fastest with [in, out] matrices (MKL); bf16 and GPUs keep nn.Linear's layout.
    model.fuse_projections(transpose=weight.dtype == torch.float32 and weight.device.type == "cpu")
    bundle = Bundle(model, codec, image_tokenizer, *_load_retrieval(root / RETRIEVAL_DIR, codec, device))
    try:
        bundle.pipeline()  # consistency checks
    except ValueError as err:
        raise ValueError(f"the files of checkpoint directory {str(root)!r} disagree: {err}") from err
    return bundle


def _load_retrieval(folder: Path, codec: DocumentCodec, device: torch.device | str) -> tuple[Any, Any]:
    """(retriever, scorer) from ``folder`` (each None when its files are absent)."""
    encoder_file, bank_file = folder / DUAL_ENCODER_FILE, folder / MEMORY_BANK_FILE
    if not encoder_file.is_file():
        if bank_file.is_file():
            raise FileNotFoundError(f"{str(bank_file)!r} needs the dual encoder it was embedded with at "
                                    f"{str(encoder_file)!r}")
        return None, None
    try:
        from ..retrieval import DualEncoder, ImageTextScorer, MemoryBank, Retriever  # noqa: PLC0415 - optional
    except ImportError as err:
        raise ImportError(f"{str(folder)!r} holds retrieval files, but cm3leon.retrieval cannot be imported "
                          f"({err}); install the retrieval extra (pip install 'cm3leon[retrieval]')") from err

    encoder = DualEncoder.load(encoder_file, device=device)
    scorer = ImageTextScorer(encoder, codec.text_tokenizer)
    if not bank_file.is_file():
        return None, scorer
    return Retriever(encoder, MemoryBank.load(bank_file), codec.text_tokenizer), scorer
