"""CM3Leon's own retriever for real data: an ``open_clip`` CLIP model behind the dual-encoder interface.

``open_clip`` (the ``open-clip-torch`` package) is optional and imported only when an adapter is built.
Weights come from a local file (nothing is downloaded)::

    encoder = OpenCLIPEncoder.from_file("ViT-B-32.safetensors", "ViT-B-32")
    bank.add(docs, embed_documents(docs, encoder, encoder.text_tokenizer))

Images (uint8, any size) are resized to the model's input size (bicubic, antialiased) and normalised with the
model's mean/std; captions are the model's own BPE ids, framed by its start/end tokens and padded or cut to its
context length. Query dropout on images drops patch tokens through the ViT's patch-dropout slot.
"""
from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import check_fraction, patch_keep_indices
from .encoder import check_images, check_text_ids

__all__ = ["OpenCLIPEncoder", "OpenCLIPTextTokenizer", "import_open_clip"]


def import_open_clip() -> ModuleType:
    """Imports ``open_clip``; ImportError with the reason if it is missing or fails to import."""
    try:
        import open_clip
    # open_clip imports torchvision, whose compiled ops fail with a RuntimeError (not an ImportError) when its
    # build does not match the installed torch: report every import-time failure the same way.
    except Exception as err:  # noqa: BLE001
        raise ImportError(f"the open_clip adapter needs an importable open_clip (pip install open-clip-torch, "
                          f"with a torchvision built for this torch); importing it failed: "
                          f"{type(err).__name__}: {err}") from err
    return open_clip


class OpenCLIPTextTokenizer:
    """An ``open_clip`` tokenizer as a ``TextTokenizerLike``: ``encode(text)`` gives its BPE ids without the
    start/end tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text))


class _KeepPatches(nn.Module):
    """Stands in the ViT's ``patch_dropout`` slot for one call: keeps the class token and chosen patches."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = torch.gather(x[:, 1:], 1, self.keep[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)


class OpenCLIPEncoder(nn.Module):
    """Wraps an ``open_clip`` CLIP model (``encode_image`` / ``encode_text``) and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model.eval()
        self.text_tokenizer = OpenCLIPTextTokenizer(tokenizer)
        visual = model.visual
        size = visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        open_clip = import_open_clip()
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.context_length = int(tokenizer.context_length)

    @classmethod
    def from_file(cls, path: str | PathLike, model_name: str = "ViT-B-32", *,
                  device: str | torch.device = "cpu") -> OpenCLIPEncoder:
        """Builds ``model_name`` (an ``open_clip`` architecture) with weights from the local file ``path``
        (``.safetensors``, ``.pt`` or ``.bin``, as ``open_clip`` reads them)."""
        open_clip = import_open_clip()
        if not Path(path).is_file():
            raise FileNotFoundError(f"open_clip weights not found: {path}")
        model = open_clip.create_model(model_name, pretrained=str(path), device=device)
        return cls(model, open_clip.get_tokenizer(model_name))

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def encode_images(self, images: torch.Tensor, *, drop: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> float32 ``[N, E]``, L2-normalised; ``drop`` > 0 drops that fraction of
        patch tokens (needs a ViT image tower and a ``generator``)."""
        images = check_images(images)
        drop = check_fraction(drop, "drop")
        if images.shape[0] == 0:
            return torch.empty(0, self.embed_dim, device=self.device)
        x = images.to(self.device, torch.float32) / 255.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        x = (x.clamp(0.0, 1.0) - self.mean) / self.std
        if not drop:
            return F.normalize(self.model.encode_image(x).float(), dim=-1)
        if generator is None:
            raise ValueError("generator is required when drop > 0 (query dropout is seeded)")
        visual = self.model.visual
        if not hasattr(visual, "patch_dropout") or not hasattr(visual, "conv1"):
            raise ValueError("drop > 0 needs an open_clip ViT image tower (patch tokens to drop)")
        patch = visual.conv1.kernel_size
        n_patches = (self.image_size[0] // patch[0]) * (self.image_size[1] // patch[1])
        keep = patch_keep_indices(x.shape[0], n_patches, drop, generator).to(self.device)
        original = visual.patch_dropout
        visual.patch_dropout = _KeepPatches(keep)
        try:
            return F.normalize(self.model.encode_image(x).float(), dim=-1)
        finally:
            visual.patch_dropout = original

    def encode_texts(self, text_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """The model's BPE ids (without start/end) -> float32 ``[N, E]``, L2-normalised. Captions longer than
        the context keep their first ids."""
        tok = self.text_tokenizer.tokenizer
        ids = check_text_ids(text_ids, self.text_tokenizer.vocab_size)
        if not ids:
            return torch.empty(0, self.embed_dim, device=self.device)
        rows = torch.zeros(len(ids), self.context_length, dtype=torch.int64)
        for i, caption in enumerate(ids):
            framed = [tok.sot_token_id, *caption[: self.context_length - 2], tok.eot_token_id]
            rows[i, : len(framed)] = torch.tensor(framed)
        return F.normalize(self.model.encode_text(rows.to(self.device)).float(), dim=-1)
