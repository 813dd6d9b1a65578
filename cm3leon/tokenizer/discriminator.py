"""Patch-GAN discriminator and hinge losses for the optional adversarial term of tokenizer training."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PatchDiscriminator", "discriminator_hinge_loss", "generator_hinge_loss"]


class PatchDiscriminator(nn.Module):
    """Three stride-2 conv layers then a 1-channel conv: one real/fake logit per overlapping patch."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(min(32, c // 2) or 1, 2 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GroupNorm(min(32, c // 2) or 1, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 1, 3, padding=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[B, 3, H, W]`` -> patch logits ``[B, 1, H/4, W/4]``."""
        return self.net(images)


def discriminator_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`` (VQ-GAN's hinge form)."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def generator_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge game: ``-mean(D(fake))``."""
    return -logits_fake.mean()
