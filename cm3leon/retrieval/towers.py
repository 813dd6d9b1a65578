"""The dual encoder's two transformers; their attention runs on ``cm3leon_kernels`` (non-causal).

- :class:`ImageTower`: a ViT over pixels: patch embedding, learned positions, pre-norm blocks, the mean of the
  final patch states. Optional patch dropout keeps a chosen subset of patch tokens.
- :class:`TextTower`: a transformer over text-tokenizer ids. Captions are packed into one sequence and run
  through ``flash_attn_varlen_func`` (no padding at all, so nothing can leak between or into captions); a
  caption's summary is the mean of its final token states.

Both towers pool by averaging rather than through a class token: at initialisation a class token's state
barely depends on the input, and small contrastive models then sit on the chance-level plateau for many
steps before they separate; the mean depends on the input from the first step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cm3leon.model import KERNELS, AttentionBackend

from .config import DualEncoderConfig

__all__ = ["ImageTower", "TextTower"]


class _Attention(nn.Module):
    """Multi-head self-attention without a causal mask."""

    def __init__(self, width: int, heads: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, width // heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int) -> torch.Tensor:
        q, k, v = self.qkv(x).view(*x.shape[:-1], 3, self.heads, self.head_dim).unbind(-3)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if cu_seqlens is None:  # [B, S, H, D]
            o = self.backend.flash_attn_func(q, k, v, causal=False)
        else:                   # packed [T, H, D]
            o = self.backend.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                    causal=False)
        return self.out(o.reshape(x.shape))


class _Block(nn.Module):
    """Pre-norm transformer block with a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _Attention(width, heads, backend)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0
                ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class ImageTower(nn.Module):
    """ViT: uint8 images ``[N, 3, S, S]`` -> embeddings ``[N, embed_dim]`` (not normalised)."""

    def __init__(self, config: DualEncoderConfig, backend: AttentionBackend = KERNELS) -> None:
        super().__init__()
        w, p = config.image_width, config.patch_size
        self.config = config
        self.patch = nn.Conv2d(3, w, kernel_size=p, stride=p)
        self.pos = nn.Parameter(torch.randn(config.num_patches, w) * 0.02)
        self.blocks = nn.ModuleList(_Block(w, config.image_heads, config.mlp_ratio, backend)
                                    for _ in range(config.image_layers))
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, config.embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``pixels``: float ``[N, 3, S, S]`` in [-1, 1]; ``keep``: int64 ``[N, K]`` indices of the patch
        tokens to keep (patch dropout), or None for all."""
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos  # [N, P, W]
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x).mean(dim=1))


class TextTower(nn.Module):
    """Transformer over packed captions: ids ``[T]`` with ``cu_seqlens`` -> embeddings ``[n, embed_dim]``."""

    def __init__(self, config: DualEncoderConfig, backend: AttentionBackend = KERNELS) -> None:
        super().__init__()
        w = config.text_width
        self.config = config
        self.embed = nn.Embedding(config.text_vocab_size, w)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(config.text_max_len, w) * 0.01)
        self.blocks = nn.ModuleList(_Block(w, config.text_heads, config.mlp_ratio, backend)
                                    for _ in range(config.text_layers))
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, config.embed_dim, bias=False)

    def forward(self, text_ids: list[list[int]]) -> torch.Tensor:
        """``text_ids``: validated, non-empty captions of at most ``text_max_len`` ids each."""
        device = self.embed.weight.device
        lengths = torch.tensor([len(ids) for ids in text_ids], dtype=torch.int64)
        cu = F.pad(lengths.cumsum(0), (1, 0))
        caption = torch.repeat_interleave(torch.arange(len(text_ids)), lengths)  # caption of every token
        positions = torch.arange(int(cu[-1])) - cu[:-1][caption]  # restart in every caption
        flat = torch.tensor([t for ids in text_ids for t in ids], dtype=torch.int64)
        x = self.embed(flat.to(device)) + self.pos[positions.to(device)]
        cu32 = cu.to(device=device, dtype=torch.int32)
        for block in self.blocks:
            x = block(x, cu32, int(lengths.max()))
        sums = torch.zeros(len(text_ids), x.shape[-1], dtype=x.dtype, device=device)
        sums = sums.index_add(0, caption.to(device), self.norm(x))
        return self.proj(sums / lengths.to(device=device, dtype=x.dtype)[:, None])
