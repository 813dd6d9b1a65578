"""The non-API names FlashAttention's tests/test_flash_attn.py imports from flash_attn, for the CPU run, and
the host-memory stand-in for its GPU-memory check.

``run.py`` points those imports here; the flash_attn API itself comes from cm3leon_kernels. Written from the
documented semantics, in plain PyTorch.
"""

from __future__ import annotations

import os
import sys

import torch

# The tests skip a few ROCm-only asserts when this is True; we are not the Triton/ROCm backend.
USE_TRITON_ROCM = False


def host_memory() -> int:
    """Stands in for the GPU's total_memory: FA skips its 2048-long cases when the reference would not fit."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block width FA's test uses to decode S_dmask: cm3leon_kernels' S_dmask is one key block scaled
    by each row's maximum over all its visible keys (docs/attention.md), so one block covering every key:
    larger than any sequence length."""
    return sys.maxsize


def apply_rotary_emb(
    x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None
):
    """Rotary embedding reference: x ``(batch, seqlen, nheads, headdim)``; cos/sin ``(seqlen_ro,
    rotary_dim / 2)``; token ``t`` of row ``b`` uses row ``seqlen_offsets[b] + t`` (or ``seqlen_offsets + t``)
    of cos/sin. Pairs are (0, 1), (2, 3), ... when ``interleaved``, else (i, i + rotary_dim / 2). Computed in
    float32, rounded once."""
    if inplace or cu_seqlens is not None:
        raise NotImplementedError("the suite's rotary reference covers the batched, out-of-place form only")
    s = x.shape[1]
    half = cos.shape[-1]
    offsets = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else torch.tensor(seqlen_offsets)
    pos = offsets.to(x.device).long().reshape(-1, 1) + torch.arange(s, device=x.device)  # (b or 1, s)
    c, si = cos.float()[pos][:, :, None], sin.float()[pos][:, :, None]  # (., s, 1, half)
    xf = x.float()
    rot = xf[..., : 2 * half]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * si, x1 * si + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c - x2 * si, x1 * si + x2 * c), -1)
    return torch.cat((out, xf[..., 2 * half :]), -1).to(x.dtype)
