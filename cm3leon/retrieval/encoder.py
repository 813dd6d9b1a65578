"""The dual encoder: image and text towers projected into one L2-normalised space (CLIP's role in retrieval).

Checkpoints are one ``.safetensors`` file with the config as JSON metadata (no pickle).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.model import KERNELS, AttentionBackend

from .config import DualEncoderConfig
from .dropout import check_fraction, patch_keep_indices
from .storage import atomic_path, read_safetensors
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
        if isinstance(ids, (str, torch.Tensor)) or not isinstance(ids, Sequence) or any(
                isinstance(t, bool) or not isinstance(t, int) for t in ids):
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
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

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
        """Writes weights + config to one ``.safetensors`` file (atomically: temp file, then rename)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _FORMAT, "config": self.config.to_json()})

    @classmethod
    def load(cls, path: str | PathLike, *, device: str | torch.device = "cpu",
             backend: AttentionBackend = KERNELS) -> DualEncoder:
        """Reads a file written by :meth:`save` (eval mode); ValueError naming ``path`` if it is damaged or
        not a dual-encoder checkpoint."""
        metadata, tensors = read_safetensors(path, what="dual encoder checkpoint")
        if metadata.get("format") != _FORMAT or "config" not in metadata:
            raise ValueError(f"{path} is not a dual encoder checkpoint (format {metadata.get('format')!r})")
        model = cls(DualEncoderConfig.from_json(metadata["config"]), backend=backend)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: weights do not match the stored config: {err}") from None
        return model.to(device).eval()
