"""Training loop of the image tokenizer: reconstruction + VQ losses, optional patch-GAN, dead-code restarts.

Loss per step (images in [-1, 1])::

    l1_weight·|x − x̂| + l2_weight·(x − x̂)² + vq_loss [+ gan_weight·(−D(x̂)) after gan_start_step]

``vq_loss`` is ``vector_quantize``'s codebook term + beta·commitment. The adversarial weight is fixed (no
VQ-GAN adaptive weight), which keeps the step simple and predictable on small models.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .discriminator import PatchDiscriminator, discriminator_hinge_loss, generator_hinge_loss
from .image import ImageTokenizer
from .image_config import ImageTokenizerConfig
from .metrics import psnr

__all__ = ["BatchSource", "TrainResult", "train_image_tokenizer"]

BatchSource = Callable[[int, int], torch.Tensor]  # (step, batch_size) -> images [B, 3, H, W]


class TrainResult(NamedTuple):
    tokenizer: ImageTokenizer
    history: list[dict[str, float]]  # one entry per logged step
    seconds: float                    # wall time of the training loop


def _batch_source(data: Any, generator: torch.Generator) -> BatchSource:
    """A tensor of images -> random batches from it; an object with ``images(n, start)`` (e.g.
    :class:`cm3leon.data.ShapesWorld`) -> fresh consecutive scenes every step."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 4 or data.shape[0] == 0:
            raise ValueError(f"images must be a non-empty [N, 3, H, W] tensor, got {tuple(data.shape)}")

        def from_tensor(step: int, batch_size: int) -> torch.Tensor:
            return data[torch.randint(data.shape[0], (batch_size,), generator=generator)]
        return from_tensor
    if callable(getattr(data, "images", None)):
        def from_world(step: int, batch_size: int) -> torch.Tensor:
            return data.images(batch_size, start=step * batch_size)
        return from_world
    raise TypeError("images_or_dataset must be an image tensor [N, 3, H, W] or have an images(n, start) method, "
                    f"got {type(data).__name__}")


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_image_tokenizer(config: ImageTokenizerConfig | str, images_or_dataset: Any, steps: int, *,
                          batch_size: int = 64, lr: float = 2e-3, warmup: int = 50, seed: int = 0,
                          tokenizer: ImageTokenizer | None = None, progress: bool = True,
                          log_every: int = 10) -> TrainResult:
    """Trains an image tokenizer on CPU (or wherever ``tokenizer`` lives).

    Args:
        config: an :class:`ImageTokenizerConfig` or a preset name (``"demo"``, ``"paper"``, ``"tiny"``).
        images_or_dataset: uint8/float image tensor ``[N, 3, H, W]`` (random batches), or an object with
            ``images(n, start) -> uint8 [n, 3, H, W]`` such as ``ShapesWorld`` (fresh scenes each step).
        steps: optimizer steps.
        batch_size: images per step.
        lr: peak Adam learning rate (warmup, then cosine decay to 10%).
        warmup: warmup steps.
        seed: seeds initialisation, batch sampling and restarts.
        tokenizer: continue training this model instead of a fresh one (its config wins).
        progress: show a tqdm progress bar with loss, PSNR and codebook usage.
        log_every: record the history every this many steps (and at the last step).

    Returns:
        :class:`TrainResult` ``(tokenizer (eval mode), history, seconds)``.
    """
    if isinstance(config, str):
        config = ImageTokenizerConfig.preset(config)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = tokenizer if tokenizer is not None else ImageTokenizer(config)
    config = model.config
    next_batch = _batch_source(images_or_dataset, gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    use_gan = config.gan_weight > 0
    if use_gan:
        disc = PatchDiscriminator(config.disc_channels).to(model.codebook.weight.device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))

    model.train()
    history: list[dict[str, float]] = []
    restarted = 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="image tokenizer", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        x = model.preprocess(next_batch(step, batch_size))
        out = model(x)
        recon_loss = config.l1_weight * F.l1_loss(out.reconstruction, x) + \
            config.l2_weight * F.mse_loss(out.reconstruction, x)
        loss = recon_loss + out.vq_loss
        gan_on = use_gan and step >= config.gan_start_step
        if gan_on:
            loss = loss + config.gan_weight * generator_hinge_loss(disc(out.reconstruction))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_on:
            d_loss = discriminator_hinge_loss(disc(x), disc(out.reconstruction.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()

        # Step 0 initialises every code from data (all are "dead"); later restarts revive unused codes.
        used = int((model.codebook.usage > 0).sum())
        if config.restart_every and step == 0:
            model.codebook.usage.zero_()  # every code counts as dead: initialise the whole codebook from data
        if config.restart_every and (step == 0 or (step + 1) % config.restart_every == 0):
            restarted += model.codebook.restart_dead(out.latents.detach().reshape(-1, config.code_dim),
                                                     config.restart_min_usage, optimizer=opt, generator=gen)
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                batch_psnr = float(psnr((x + 1) / 2, ((out.reconstruction + 1) / 2).clamp(0, 1)).mean())
            entry = {"step": step, "loss": loss.item(), "recon_loss": recon_loss.item(),
                     "vq_loss": out.vq_loss.item(), "psnr": batch_psnr, "codes_used": used,
                     "restarted": restarted, "seconds": time.perf_counter() - start}
            if gan_on:
                entry["d_loss"] = d_loss.item()
            history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", psnr=f"{batch_psnr:.2f}", codes=used)
    bar.close()
    return TrainResult(model.eval(), history, time.perf_counter() - start)
