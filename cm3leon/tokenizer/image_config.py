"""Configuration of the VQ-GAN-style image tokenizer, with the paper's and the demo's presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["ImageTokenizerConfig"]


@dataclass(frozen=True)
class ImageTokenizerConfig:
    """Shape of the image tokenizer and its training losses.

    The encoder has one resolution stage per ``channel_mult`` entry and a stride-2 downsampling between
    consecutive stages, so the token grid side is ``image_size / 2 ** (len(channel_mult) - 1)``.

    Attributes:
        image_size: side of the square input images (pixels).
        codebook_size: number of codes K.
        code_dim: code vector dimension D (small D keeps codes in use).
        base_channels: channels of the first (full-resolution) stage.
        channel_mult: channel multiplier per resolution stage.
        res_blocks: residual blocks per stage, full resolution first (encoder and decoder alike); an int
            means the same count at every stage. Full-resolution blocks dominate the CPU cost.
        beta: commitment weight of ``vector_quantize`` (the codebook term has weight 1).
        metric: ``"l2"`` or ``"cosine"`` nearest-code metric.
        l1_weight / l2_weight: pixel reconstruction loss weights (images in [-1, 1]).
        gan_weight: weight of the patch-GAN generator loss (0 disables the adversarial loss entirely).
        gan_start_step: adversarial loss joins after this many steps (reconstruction first, as VQ-GAN).
        disc_channels: width of the patch-GAN discriminator's first layer.
        restart_every: dead-code restart period in steps (0 disables restarts).
        restart_min_usage: a code used fewer times than this since the last restart is dead.
    """

    image_size: int = 32
    codebook_size: int = 512
    code_dim: int = 32
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    res_blocks: int | tuple[int, ...] = (0, 1, 1)  # stored as a tuple after __post_init__
    beta: float = 0.25
    metric: str = "l2"
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    gan_weight: float = 0.0
    gan_start_step: int = 0
    disc_channels: int = 64
    restart_every: int = 50
    restart_min_usage: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        blocks = self.res_blocks
        if isinstance(blocks, int) and not isinstance(blocks, bool):
            blocks = (blocks,) * len(self.channel_mult)
        object.__setattr__(self, "res_blocks", tuple(int(b) for b in blocks))
        for name in ("image_size", "codebook_size", "code_dim", "base_channels", "disc_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if len(self.res_blocks) != len(self.channel_mult) or min(self.res_blocks) < 0:
            raise ValueError(f"res_blocks must be an int or one non-negative int per stage "
                             f"({len(self.channel_mult)}), got {self.res_blocks}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by the downsampling factor "
                             f"({self.downsample})")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {self.metric!r}")
        for name in ("beta", "l1_weight", "l2_weight", "gan_weight"):
            if not 0 <= getattr(self, name) < math.inf:  # also rejects NaN
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.restart_every < 0 or self.gan_start_step < 0:
            raise ValueError("restart_every and gan_start_step must be >= 0")

    @property
    def downsample(self) -> int:
        """Pixels per token along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the token grid (tokens per image = ``grid_size ** 2``)."""
        return self.image_size // self.downsample

    @classmethod
    def preset(cls, name: str, **overrides) -> ImageTokenizerConfig:
        """``"paper"``: 256x256 -> 32x32 tokens, codebook 8192 (docs/recipe.md §2);
        ``"demo"``: 32x32 -> 8x8 tokens, codebook 512 (trains on CPU in minutes);
        ``"tiny"``: for tests (16x16 -> 4x4, codebook 64, narrow)."""
        presets = {
            "paper": {"image_size": 256, "codebook_size": 8192, "code_dim": 256, "base_channels": 128,
                          "channel_mult": (1, 1, 2, 2), "res_blocks": 2, "gan_weight": 0.1, "gan_start_step": 10_000},
            "demo": {},
            "tiny": {"image_size": 16, "codebook_size": 64, "code_dim": 8, "base_channels": 8, "channel_mult": (1, 2, 2),
                         "res_blocks": (1, 1, 1), "disc_channels": 8, "restart_every": 5},
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["res_blocks"] = list(self.res_blocks)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ImageTokenizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ImageTokenizerConfig fields: {sorted(unknown)}")
        return cls(**data)
