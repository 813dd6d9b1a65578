"""VQ-GAN-style image tokenizer: conv encoder -> fused ``vector_quantize`` -> conv decoder (docs/recipe.md §2).

Images enter as ``uint8`` ``[B, 3, H, W]`` (0..255) or floating ``[B, 3, H, W]`` in [0, 1]; internally the
network sees [-1, 1]. Tokens are int64 ``[B, h, w]`` codebook indices (``h = w = config.grid_size``).
Checkpoints are one safetensors file (no pickle: loading never runs code) with the config as JSON metadata
and checksums (:mod:`cm3leon.integrity`); damaged files raise :class:`~cm3leon.integrity.CheckpointError`.
"""
from __future__ import annotations

import json
from os import PathLike
from typing import NamedTuple

import torch
from torch import nn

from cm3leon_kernels import vq_nearest

from .._checks import check_int
from ..integrity import TensorFile, check_index, save_tensor_file
from .codebook import Codebook
from .image_config import ImageTokenizerConfig
from .image_modules import Decoder, Encoder

__all__ = ["ImageTokenizer", "TokenizerOutput"]

_FORMAT = "cm3leon-image-tokenizer"


def _check_batch_size(batch_size: object) -> None:
    check_int("batch_size", batch_size, 1)


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  # [B, 3, H, W], in [-1, 1] space (not clamped: the loss sees raw values)
    indices: torch.Tensor         # int64 [B, h, w]
    vq_loss: torch.Tensor         # scalar codebook + beta * commitment loss
    latents: torch.Tensor         # [B, h, w, D] encoder outputs before quantisation (for restarts)


class ImageTokenizer(nn.Module):
    """Encoder, codebook and decoder built from an :class:`ImageTokenizerConfig`."""

    def __init__(self, config: ImageTokenizerConfig) -> None:
        super().__init__()
        if not isinstance(config, ImageTokenizerConfig):
            raise TypeError(f"config must be an ImageTokenizerConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.codebook = Codebook(config.codebook_size, config.code_dim, beta=config.beta, metric=config.metric)
        self.decoder = Decoder(config)

    # ---- input handling --------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Validates ``images`` and maps them to float32 [-1, 1] on the model's device."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(f"images must have shape [B, 3, {size}, {size}], got {tuple(images.shape)}")
        device = self.codebook.weight.device
        if images.dtype == torch.uint8:
            return images.to(device=device, dtype=torch.float32) / 127.5 - 1.0
        if images.dtype.is_floating_point:
            # A float image in 0..255 (a common slip) would otherwise give garbage tokens silently.
            if images.numel() and not (0.0 <= float(images.min()) and float(images.max()) <= 1.0):
                raise ValueError("floating-point images must be in [0, 1] (uint8 images are 0..255); got values "
                                 f"in [{float(images.min()):g}, {float(images.max()):g}]")
            return images.to(device=device, dtype=torch.float32) * 2.0 - 1.0
        raise TypeError(f"images must be uint8 (0..255) or floating point (0..1), got {images.dtype}")

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validates a token grid batch ``[B, h, w]`` of codebook indices; returns it as int64."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        g = self.config.grid_size
        if tokens.ndim != 3 or tokens.shape[1] != g or tokens.shape[2] != g:
            raise ValueError(f"tokens must have shape [B, {g}, {g}], got {tuple(tokens.shape)}")
        k = self.config.codebook_size
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
            raise ValueError(f"tokens out of range [0, {k}): min {int(tokens.min())}, max {int(tokens.max())}")
        return tokens.to(device=self.codebook.weight.device, dtype=torch.int64)

    # ---- the network -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        """Training pass on preprocessed images ``x`` in [-1, 1] (see :meth:`preprocess`)."""
        latents = self.encoder(x).permute(0, 2, 3, 1).contiguous()  # channels-last for the VQ kernel
        vq = self.codebook(latents)
        recon = self.decoder(vq.quantized.permute(0, 3, 1, 2))
        return TokenizerOutput(recon, vq.indices, vq.loss, latents)

    def decode_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder output in [-1, 1] space for validated int64 ``tokens`` ``[B, h, w]`` (differentiable)."""
        return self.decoder(self.codebook.lookup(tokens).permute(0, 3, 1, 2))

    # ---- public batched API ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` (uint8 0..255 or float 0..1) -> int64 tokens ``[B, h, w]``."""
        _check_batch_size(batch_size)
        x = self.preprocess(images)
        out = []
        for chunk in x.split(batch_size):
            latents = self.encoder(chunk).permute(0, 2, 3, 1).contiguous()
            out.append(self._nearest(latents))
        return torch.cat(out) if out else torch.empty(0, *([self.config.grid_size] * 2), dtype=torch.int64)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, *, batch_size: int = 256, as_uint8: bool = False) -> torch.Tensor:
        """Tokens ``[B, h, w]`` -> images ``[B, 3, H, W]``: float32 in [0, 1], or uint8 if ``as_uint8``."""
        _check_batch_size(batch_size)
        tokens = self.check_tokens(tokens)
        size = self.config.image_size
        chunks = [((self.decode_codes(t) + 1.0) / 2.0).clamp_(0.0, 1.0) for t in tokens.split(batch_size)]
        images = torch.cat(chunks) if chunks else torch.empty(0, 3, size, size)
        return (images * 255.0).round_().to(torch.uint8) if as_uint8 else images

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, *, as_uint8: bool = False) -> torch.Tensor:
        """``decode(encode(images))``."""
        return self.decode(self.encode(images), as_uint8=as_uint8)

    def _nearest(self, latents: torch.Tensor) -> torch.Tensor:
        # The fused nearest-code search is the eval form of the quantiser (no losses, no usage counting).
        indices, _ = vq_nearest(latents, self.codebook.weight.detach(), metric=self.config.metric)
        return indices

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save(self, path: str | PathLike) -> None:
        """Writes config + weights to one safetensors file (with checksums)."""
        save_tensor_file(path, self.state_dict(), kind=_FORMAT,
                         metadata={"config": json.dumps(self.config.to_dict())})

    @classmethod
    def load(cls, path: str | PathLike, map_location: str | torch.device | None = "cpu", *,
             verify: bool = True) -> ImageTokenizer:
        """Reads a checkpoint written by :meth:`save`; returns the tokenizer in eval mode.

        ``verify=False`` skips the checksums. Raises FileNotFoundError, or
        :class:`~cm3leon.integrity.CheckpointError` for a file that is not a readable image tokenizer, has an
        invalid config, tensors that do not match it (names, shapes, dtypes) or a failing checksum.
        """
        with TensorFile(path, kind=_FORMAT, verify=verify, what="cm3leon image tokenizer") as f:
            data = f.json_entry("config")
            try:
                if not isinstance(data, dict):
                    raise TypeError(f"expected a JSON object, got {type(data).__name__}")
                config = ImageTokenizerConfig.from_dict(data)
            except (TypeError, ValueError) as err:
                raise f.error(f"invalid image tokenizer config: {err}") from None
            index = f.index()
            # Module count grows with the stages and residual blocks, each holding tensors: bounding them by
            # the file's tensor count keeps even the meta-device build below proportional to the file.
            if len(config.channel_mult) + sum(config.res_blocks) > len(index):
                raise f.error(f"config asks for {len(config.channel_mult)} stages and "
                              f"{sum(config.res_blocks)} residual blocks but the file holds only {len(index)} "
                              "tensors")
            with torch.device("meta"):
                expected = cls(config).state_dict()
            check_index(index, expected, f.error)
            tensors = f.tensors()
        model = cls(config)  # sizes now match the file's, so this allocation is bounded by it
        model.load_state_dict(tensors)
        return model.to(map_location).eval()

    @property
    def tokens_per_image(self) -> int:
        return self.config.grid_size ** 2
