"""One id space for specials, text tokens and image codes (docs/recipe.md §2).

Layout (half-open ranges)::

    [0, n_special)                          specials: <pad> <eos> <break> <mask> <infill> <mask:0> .. <mask:15>
    [n_special, n_special + text_size)      text ids (the BPE's own ids, shifted)
    [.., .. + image_codes)                  image codes (codebook indices, shifted)

``image_range`` is the ``(lo, hi)`` pair that ``cfg_sample(..., allowed_range=...)`` takes to restrict
sampling to image tokens.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike

import torch

from ..integrity import CheckpointError, json_digest, parse_json

__all__ = ["NUM_SENTINELS", "SPECIAL_TOKENS", "Vocabulary"]

NUM_SENTINELS = 16
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<break>", "<mask>", "<infill>") + tuple(
    f"<mask:{i}>" for i in range(NUM_SENTINELS))

IdsLike = int | Sequence[int] | torch.Tensor


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class Vocabulary:
    """Maps specials, text ids and image codes into one contiguous id space.

    Args:
        text_size: number of text ids (the BPE vocabulary size).
        image_codes: number of image codes (the VQ codebook size).
    """

    def __init__(self, text_size: int, image_codes: int) -> None:
        self.text_size = _check_count("text_size", text_size)
        self.image_codes = _check_count("image_codes", image_codes)
        self._special_ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

    # ---- sizes and ranges ------------------------------------------------------------------------------
    @property
    def num_special(self) -> int:
        """Number of special tokens (they occupy ids ``[0, num_special)``)."""
        return len(SPECIAL_TOKENS)

    @property
    def text_range(self) -> tuple[int, int]:
        """Half-open global id range of text tokens."""
        return self.num_special, self.num_special + self.text_size

    @property
    def image_range(self) -> tuple[int, int]:
        """Half-open global id range of image codes (for ``allowed_range``)."""
        lo = self.num_special + self.text_size
        return lo, lo + self.image_codes

    def __len__(self) -> int:
        return self.num_special + self.text_size + self.image_codes

    @property
    def size(self) -> int:
        """Total number of ids (the model's vocabulary size)."""
        return len(self)

    # ---- specials --------------------------------------------------------------------------------------
    def special_id(self, token: str) -> int:
        """Global id of a special token such as ``"<break>"``; KeyError for an unknown name."""
        try:
            return self._special_ids[token]
        except KeyError:
            raise KeyError(f"unknown special token {token!r}; known: {SPECIAL_TOKENS}") from None

    @property
    def pad_id(self) -> int:
        return self._special_ids["<pad>"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["<eos>"]

    @property
    def break_id(self) -> int:
        return self._special_ids["<break>"]

    @property
    def mask_id(self) -> int:
        return self._special_ids["<mask>"]

    @property
    def infill_id(self) -> int:
        return self._special_ids["<infill>"]

    def sentinel_id(self, i: int) -> int:
        """Global id of the enumerated CM3 sentinel ``<mask:i>``, ``0 <= i < 16``."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < NUM_SENTINELS:
            raise ValueError(f"sentinel index i must be an int in [0, {NUM_SENTINELS}), got {i!r}")
        return self._special_ids[f"<mask:{i}>"]

    def special_name(self, token_id: int) -> str:
        """Name of a special id; ValueError if ``token_id`` is not special."""
        if not 0 <= token_id < self.num_special:
            raise ValueError(f"token_id {token_id} is not a special id (range [0, {self.num_special}))")
        return SPECIAL_TOKENS[token_id]

    # ---- classification --------------------------------------------------------------------------------
    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_special

    def is_text(self, token_id: int) -> bool:
        lo, hi = self.text_range
        return lo <= token_id < hi

    def is_image(self, token_id: int) -> bool:
        lo, hi = self.image_range
        return lo <= token_id < hi

    # ---- conversions -----------------------------------------------------------------------------------
    def text_to_global(self, ids: IdsLike) -> IdsLike:
        """Text-tokenizer ids -> global ids (int, list/tuple of ints, or int tensor; same kind back)."""
        return _shift("ids", ids, (0, self.text_size), self.text_range[0])

    def global_to_text(self, ids: IdsLike) -> IdsLike:
        """Global ids in ``text_range`` -> text-tokenizer ids."""
        return _shift("ids", ids, self.text_range, -self.text_range[0])

    def image_to_global(self, codes: IdsLike) -> IdsLike:
        """Codebook indices -> global ids (int, list/tuple of ints, or int tensor; same kind back)."""
        return _shift("codes", codes, (0, self.image_codes), self.image_range[0])

    def global_to_image(self, ids: IdsLike) -> IdsLike:
        """Global ids in ``image_range`` -> codebook indices."""
        return _shift("ids", ids, self.image_range, -self.image_range[0])

    # ---- persistence -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"text_size": self.text_size, "image_codes": self.image_codes,
                "special_tokens": list(SPECIAL_TOKENS)}

    def save(self, path: str | PathLike) -> None:
        """Writes the vocabulary as JSON, with a ``checksum`` field (SHA-256 of the other fields)."""
        data = self.to_dict()
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data | {"checksum": json_digest(data)}, f, indent=2)

    @classmethod
    def load(cls, path: str | PathLike, *, verify: bool = True) -> Vocabulary:
        """Reads a vocabulary written by :meth:`save` (``verify=False`` skips the checksum).

        Raises FileNotFoundError, or :class:`~cm3leon.integrity.CheckpointError` (a ``ValueError``) naming
        the file when it is not valid JSON, lacks a field, holds invalid sizes, its special tokens differ
        from ours, or its checksum is missing or wrong.
        """
        def error(message: str) -> CheckpointError:
            return CheckpointError(f"{path}: {message}")

        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise error(f"not UTF-8 text ({err})") from None
        data = parse_json(text, error, "the vocabulary")
        if not isinstance(data, dict):
            raise error(f"must hold a JSON object, got {type(data).__name__}")
        specials = data.get("special_tokens")
        if not isinstance(specials, list) or tuple(specials) != SPECIAL_TOKENS:
            raise error(f"special tokens {specials} do not match {SPECIAL_TOKENS}")
        try:
            vocabulary = cls(text_size=data["text_size"], image_codes=data["image_codes"])
        except KeyError as err:
            raise error(f"missing field {err}") from None
        except (TypeError, ValueError) as err:
            raise error(str(err)) from None
        if verify and "checksum" not in data:
            raise error("has no checksum (written by an older cm3leon?); pass verify=False to load it unverified")
        if verify and data["checksum"] != json_digest(vocabulary.to_dict()):
            raise error("fails its checksum (the file is damaged); verify=False loads it anyway")
        return vocabulary

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"Vocabulary(text_size={self.text_size}, image_codes={self.image_codes}, "
                f"size={len(self)}, image_range={self.image_range})")


def _shift(name: str, ids: IdsLike, valid: tuple[int, int], offset: int) -> IdsLike:
    """Adds ``offset`` to ids after checking they lie in ``valid`` (half-open); keeps the container kind."""
    lo, hi = valid
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < lo or int(ids.max()) >= hi):
            raise ValueError(f"{name} out of range [{lo}, {hi}): min {int(ids.min())}, max {int(ids.max())}")
        return ids + offset
    if isinstance(ids, bool):
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got bool")
    if isinstance(ids, int):
        if not lo <= ids < hi:
            raise ValueError(f"{name} out of range [{lo}, {hi}): {ids}")
        return ids + offset
    if isinstance(ids, (list, tuple)):
        out = [_shift(name, i, valid, offset) for i in ids]
        return type(ids)(out)
    raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got {type(ids).__name__}")
