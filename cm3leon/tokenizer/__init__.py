"""Tokenizers of cm3leon: byte-level BPE text, VQ-GAN-style images, one shared vocabulary, document layout.

- :class:`TextTokenizer` (``text.py``): byte-level BPE trained with Hugging Face ``tokenizers``.
- :class:`ImageTokenizer` (``image.py``) with :class:`ImageTokenizerConfig` presets and
  :func:`train_image_tokenizer`: images <-> token grids.
- :class:`Vocabulary` (``vocabulary.py``): specials + text ids + image codes in one id space.
- :class:`DocumentCodec` (``document.py``): documents (text / image segments) <-> global ids.
"""
from .document import DocumentCodec, Segment, tokenize_images
from .image import ImageTokenizer, TokenizerOutput
from .image_config import ImageTokenizerConfig
from .image_training import TrainResult, train_image_tokenizer
from .metrics import psnr
from .text import PAPER_TEXT_VOCAB_SIZE, TextTokenizer
from .vocabulary import NUM_SENTINELS, SPECIAL_TOKENS, Vocabulary

__all__ = [
    "NUM_SENTINELS",
    "PAPER_TEXT_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "DocumentCodec",
    "ImageTokenizer",
    "ImageTokenizerConfig",
    "Segment",
    "TextTokenizer",
    "TokenizerOutput",
    "TrainResult",
    "Vocabulary",
    "psnr",
    "tokenize_images", "train_image_tokenizer",
]
