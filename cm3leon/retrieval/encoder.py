"""The dual encoder: image and text towers projected into one L2-normalised space (CLIP's role in retrieval).

Checkpoints are one checksummed ``.safetensors`` file with the config as JSON metadata (no pickle; see
:mod:`cm3leon.integrity`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.integrity import TensorFile, check_index, save_tensor_file
from cm3leon.model import KERNELS, AttentionBackend

from .._checks import is_int
from .config import DualEncoderConfig
from .dropout import check_fraction, patch_keep_indices
from .towers import ImageTower, TextTower

__all__ = ["DualEncoder", "ImageTextEncoder", "check_images", "check_text_ids"]

_FORMAT = "cm3leon-dual-encoder-v1"


@runtime_checkable
class ImageTextEncoder(Protocol):
    """What the retriever, the scorer and :func:`embed_documents` need from an encoder."""

    embed_dim: int

    def encode_images(self, images: torch.Tensor, *, drop: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor: ...

    def encode_texts(self, text_ids: Sequence[Sequence[int]]) -> torch.Tensor: ...


def check_images(images: object, name: str = "images") -> torch.Tensor:
    """Validates a uint8 image batch ``[N, 3, H, W]``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be uint8 [N, 3, H, W], got {images.dtype} of shape {tuple(images.shape)}")
    return images


def check_text_ids(text_ids: object, vocab_size: int, name: str = "text_ids") -> list[list[int]]:
    """Validates captions as lists of text-tokenizer ids in ``[0, vocab_size)``, each non-empty."""
    if isinstance(text_ids, (str, torch.Tensor)) or not isinstance(text_ids, Sequence):
        raise TypeError(f"{name} must be a list of lists of ints, got {type(text_ids).__name__}")
    out = []
    for i, ids in enumerate(text_ids):
        if isinstance(ids, (str, torch.Tensor)) or not isinstance(ids, Sequence) or not all(is_int(t) for t in ids):
            raise TypeError(f"{name}[{i}] must be a list of ints")
        if not ids:
            raise ValueError(f"{name}[{i}] is empty")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"{name}[{i}] has ids outside [0, {vocab_size}): min {min(ids)}, max {max(ids)}")
        out.append(list(ids))
    return out


class DualEncoder(nn.Module):
    """Image tower + text tower + a learned temperature.

    Args:
        config: a :class:`DualEncoderConfig` or a preset name (``"demo"``, ``"clip-b32"``).
        backend: the attention entry points (``cm3leon_kernels`` by default).
    """

    def __init__(self, config: DualEncoderConfig | str, *, backend: AttentionBackend = KERNELS) -> None:
        super().__init__()
        if isinstance(config, str):
            config = DualEncoderConfig.preset(config)
        if not isinstance(config, DualEncoderConfig):
            raise TypeError(f"config must be a DualEncoderConfig or a preset name, got {type(config).__name__}")
        self.config = config
        self.image_tower = ImageTower(config, backend)
        self.text_tower = TextTower(config, backend)
        # log(1 / temperature), as CLIP; clamped to a temperature >= 0.01 when used
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def temperature_scale(self) -> torch.Tensor:
        """``1 / temperature`` (at most 100)."""
        # exp(float32(log 100)) rounds to 100.0000076: clamp the result too, so the cap holds exactly (the
        # first clamp keeps exp finite, so its gradient is never 0 * inf).
        return self.logit_scale.clamp(max=math.log(100.0)).exp().clamp(max=100.0)

    def encode_images(self, images: torch.Tensor, *, drop: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> float32 ``[N, E]``, L2-normalised (differentiable in grad mode).

        Images of another size are resized to ``config.image_size``. ``drop`` > 0 drops that fraction of
        patch tokens per image before the transformer (query dropout), chosen with ``generator``.
        """
        images = check_images(images)
        drop = check_fraction(drop, "drop")
        if drop and generator is None:
            raise ValueError("generator is required when drop > 0 (query dropout is seeded)")
        if images.shape[0] == 0:
            return torch.empty(0, self.embed_dim, device=self.device)
        x = images.to(self.device, torch.float32) / 127.5 - 1.0
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        keep = None
        if drop:
            keep = patch_keep_indices(x.shape[0], self.config.num_patches, drop, generator).to(self.device)
        return F.normalize(self.image_tower(x, keep), dim=-1)

    def encode_texts(self, text_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Captions as text-tokenizer ids -> float32 ``[N, E]``, L2-normalised. Captions longer than
        ``config.text_max_len`` keep their first ids."""
        ids = check_text_ids(text_ids, self.config.text_vocab_size)
        if not ids:
            return torch.empty(0, self.embed_dim, device=self.device)
        return F.normalize(self.text_tower([c[: self.config.text_max_len] for c in ids]), dim=-1)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save(self, path: str | PathLike) -> None:
        """Writes weights + config to one checksummed ``.safetensors`` file (to a temporary name, then
        renamed: ``path`` is never half-written)."""
        save_tensor_file(path, self.state_dict(), kind=_FORMAT, metadata={"config": self.config.to_json()})

    @classmethod
    def load(cls, path: str | PathLike, *, device: str | torch.device = "cpu",
             backend: AttentionBackend = KERNELS, verify: bool = True) -> DualEncoder:
        """Reads a file written by :meth:`save` (eval mode). Raises FileNotFoundError, or
        :class:`~cm3leon.integrity.CheckpointError` (a ValueError) naming ``path`` for a truncated, damaged
        (failing checksum; ``verify=False`` skips them) or foreign file, or weights that do not match its
        config."""
        with TensorFile(path, kind=_FORMAT, verify=verify, what="dual encoder checkpoint") as f:
            try:
                config = DualEncoderConfig.from_json(f.metadata["config"])
            except (KeyError, TypeError, ValueError) as err:
                raise f.error(f"invalid dual encoder config: {err}") from None
            with torch.device("meta"):
                expected = cls(config, backend=backend).state_dict()
            check_index(f.index(), expected, f.error)
            tensors = f.tensors()
        model = cls(config, backend=backend)
        model.load_state_dict(tensors)
        return model.to(device).eval()
