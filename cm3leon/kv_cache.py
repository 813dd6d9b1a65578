"""A preallocated, static KV cache: one tensor per layer stack, per-row fill lengths."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys/values of every layer, written in place by ``flash_attn_with_kvcache``.

    Attributes:
        k, v: ``[n_layers, batch, max_len, n_kv_heads, head_dim]``; ``k[layer]`` is a contiguous view.
        seqlens: int32 ``[batch]``: how many positions of each row are filled (rows may differ: ragged prompts,
            or CFG streams whose prompts have different lengths).
    """

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor

    @classmethod
    def allocate(cls, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.int32, device=device))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        """Forget every row's contents (the memory is reused, not freed)."""
        self.seqlens.zero_()
