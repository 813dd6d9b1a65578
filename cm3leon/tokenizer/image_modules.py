"""Convolutional encoder and decoder of the image tokenizer (VQ-GAN layout, without attention blocks).

Attention blocks at the lowest resolution (as in VQ-GAN) are left out: for the small demo grids the
convolutions' receptive field already spans the image, and they dominate CPU time at the paper's size.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .image_config import ImageTokenizerConfig

__all__ = ["Decoder", "Encoder", "ResBlock"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(silu(norm(conv(silu(norm(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _stage_channels(config: ImageTokenizerConfig) -> list[int]:
    return [config.base_channels * m for m in config.channel_mult]


class Encoder(nn.Module):
    """Images ``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, code_dim, H/f, W/f]``."""

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        chans = _stage_channels(config)
        layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1)]
        for i, ch in enumerate(chans):
            layers += [ResBlock(ch) for _ in range(config.res_blocks[i])]
            if i + 1 < len(chans):
                layers.append(nn.Conv2d(ch, chans[i + 1], 4, stride=2, padding=1))
        layers += [_norm(chans[-1]), nn.SiLU(), nn.Conv2d(chans[-1], config.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Quantised latents ``[B, code_dim, h, w]`` -> images ``[B, 3, h·f, w·f]`` (unbounded; ~[-1, 1])."""

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        chans = _stage_channels(config)[::-1]
        blocks = config.res_blocks[::-1]
        layers: list[nn.Module] = [nn.Conv2d(config.code_dim, chans[0], 3, padding=1)]
        for i, ch in enumerate(chans):
            layers += [ResBlock(ch) for _ in range(blocks[i])]
            if i + 1 < len(chans):
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, chans[i + 1], 3, padding=1)]
        layers += [_norm(chans[-1]), nn.SiLU(), nn.Conv2d(chans[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
