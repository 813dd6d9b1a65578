"""Byte-level BPE text tokenizer trained with the Hugging Face ``tokenizers`` library (docs/recipe.md §2).

Byte-level: every string, whatever its characters or whitespace, maps to tokens and decodes back to the
same string byte for byte (no normalisation, no added prefix space, no special tokens of its own: the
specials live in :class:`~cm3leon.tokenizer.vocabulary.Vocabulary`, so text such as ``"<eos>"`` inside a
caption is ordinary text).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from os import PathLike

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .._checks import check_int, is_int
from ..integrity import CheckpointError

__all__ = ["PAPER_TEXT_VOCAB_SIZE", "TextTokenizer"]

PAPER_TEXT_VOCAB_SIZE = 56_320
_BYTE_ALPHABET = 256


def _byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class TextTokenizer:
    """A byte-level BPE; build one with :meth:`train` or :meth:`load`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int = PAPER_TEXT_VOCAB_SIZE,
              min_frequency: int = 2) -> TextTokenizer:
        """Learns BPE merges on ``corpus`` (an iterable of strings).

        Args:
            corpus: training strings.
            vocab_size: upper bound on the vocabulary (256 byte symbols + merges); a small corpus may stop
                earlier, so read :attr:`vocab_size` for the real size. Paper: 56,320.
            min_frequency: a pair must occur this often to be merged.
        """
        check_int("vocab_size", vocab_size, _BYTE_ALPHABET)  # at least the byte alphabet
        check_int("min_frequency", min_frequency, 0)  # `tokenizers` takes an unsigned int
        if isinstance(corpus, str):
            raise TypeError("corpus must be an iterable of strings, not a single string")
        tok = _byte_level_bpe()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(_checked_strings(corpus), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        """Number of text ids (ids are ``0 .. vocab_size - 1``)."""
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids (local to this tokenizer; see ``Vocabulary.text_to_global``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # `tokenizers` refuses strings that are not valid UTF-8 (lone surrogates)
            raise _not_unicode("text") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Batched :meth:`encode` (runs in parallel inside ``tokenizers``)."""
        if isinstance(texts, str):  # would be taken as a batch of one-character texts
            raise TypeError("texts must be a sequence of strings, not a single string")
        texts = list(_checked_strings(texts, name="texts"))
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            raise _not_unicode("texts") from None

    def decode(self, ids: Sequence[int]) -> str:
        """BPE ids -> text; ValueError if an id is outside ``[0, vocab_size)``."""
        ids = list(ids)
        bad = [i for i in ids if not is_int(i) or not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be ints in [0, {self.vocab_size}), got {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, path: str | PathLike) -> None:
        """Writes the tokenizer as one JSON file (the ``tokenizers`` format)."""
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | PathLike) -> TextTokenizer:
        """Reads a file written by :meth:`save`.

        Raises FileNotFoundError, or :class:`~cm3leon.integrity.CheckpointError` naming the file when it is
        not a readable ``tokenizers`` file or not a byte-level BPE.
        """
        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as err:  # `tokenizers` raises a bare Exception for damaged JSON
            raise CheckpointError(f"{path}: not a readable tokenizer file ({err})") from None
        if not (isinstance(tok.model, models.BPE) and isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel)
                and isinstance(tok.decoder, decoders.ByteLevel)):
            raise CheckpointError(f"{path}: not a byte-level BPE tokenizer (model "
                                  f"{type(tok.model).__name__}, pre-tokenizer {type(tok.pre_tokenizer).__name__})")
        return cls(tok)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"


def _not_unicode(name: str) -> ValueError:
    return ValueError(f"{name} must be valid Unicode: a lone surrogate (e.g. '\\ud800') has no UTF-8 bytes "
                      "to tokenize")


def _checked_strings(items: Iterable[str], name: str = "corpus") -> Iterable[str]:
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(s).__name__}")
        yield s
