"""Shape of the dual encoder (image tower + text tower), with a demo preset and a CLIP ViT-B/32-sized one."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from cm3leon._checks import check_int
from cm3leon.config import dataclass_from_json
from cm3leon.tokenizer.text import PAPER_TEXT_VOCAB_SIZE

__all__ = ["DualEncoderConfig"]

_POSITIVE_INTS = ("image_size", "patch_size", "image_width", "image_layers", "image_heads", "text_vocab_size",
                  "text_max_len", "text_width", "text_layers", "text_heads", "embed_dim")


@dataclass(frozen=True)
class DualEncoderConfig:
    """Sizes of both towers and of the shared embedding space.

    Attributes:
        image_size: side of the square input images (pixels); other sizes are resized to it.
        patch_size: ViT patch side; ``image_size`` must be a multiple of it.
        image_width / image_layers / image_heads: the image transformer.
        text_vocab_size: number of text-tokenizer ids the text tower embeds.
        text_max_len: longest caption in tokens; longer ones are cut (the first tokens are kept).
        text_width / text_layers / text_heads: the text transformer.
        embed_dim: the shared embedding dimension E.
        init_temperature: initial softmax temperature of the contrastive loss (learned, CLIP starts at 0.07).
        mlp_ratio: feed-forward width as a multiple of the tower width.
    """

    image_size: int = 32
    patch_size: int = 8
    image_width: int = 128
    image_layers: int = 2
    image_heads: int = 4
    text_vocab_size: int = 1024
    text_max_len: int = 64
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 128
    init_temperature: float = 0.07
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in (*_POSITIVE_INTS, "mlp_ratio"):
            value = getattr(self, name)
            check_int(name, value, 1)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        for tower in ("image", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            head_dim, rest = divmod(width, heads)
            # the fused attention kernel takes head dims that are multiples of 8 in [8, 256]
            if rest or head_dim % 8 or not 8 <= head_dim <= 256:
                raise ValueError(f"{tower}_width / {tower}_heads must be a multiple of 8 in [8, 256], got "
                                 f"{width} / {heads}")
        if not 0.0 < self.init_temperature < 1.0:
            raise ValueError(f"init_temperature must be in (0, 1), got {self.init_temperature!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def replace(self, **changes: Any) -> DualEncoderConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DualEncoderConfig:
        return dataclass_from_json(cls, text)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DualEncoderConfig:
        """``"demo"`` (32x32 shapes images in 8x8 patches, about 1M parameters) or ``"clip-b32"`` (CLIP
        ViT-B/32's sizes: 224 px, 32 px patches, 12x768 image tower, 12x512 text tower, E = 512, over the
        paper-sized BPE);
        ``overrides`` replace fields (e.g. ``text_vocab_size=tokenizer.vocab_size``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)


PRESETS: dict[str, DualEncoderConfig] = {
    "demo": DualEncoderConfig(),
    "clip-b32": DualEncoderConfig(image_size=224, patch_size=32, image_width=768, image_layers=12,
                                  image_heads=12,
                                  text_vocab_size=PAPER_TEXT_VOCAB_SIZE, text_max_len=77, text_width=512,
                                  text_layers=12, text_heads=8, embed_dim=512),
}
