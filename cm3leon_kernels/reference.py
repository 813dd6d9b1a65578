"""Plain-PyTorch implementations of every op: the test oracle (run in float64) and the benchmark baseline.

They materialise whatever is convenient (full distance matrices, sorted vocabularies); they are meant to be
obviously right, not fast.
"""
from __future__ import annotations

import torch

__all__ = ["vq_distances", "vq_nearest", "vq_embed"]


def vq_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """The full ``[N, K]`` distance matrix for ``z [N, D]`` in the dtype of the inputs."""
    if metric == "l2":
        return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    zn = z.norm(dim=-1, keepdim=True)
    cn = codebook.norm(dim=-1)
    cos = (z @ codebook.T) / (zn * cn[None, :])
    cos = torch.where((zn == 0) | (cn[None, :] == 0), torch.zeros_like(cos), cos)
    return 1 - cos


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference nearest-code search over ``z [..., D]``; lowest index on ties."""
    flat = z.reshape(-1, z.shape[-1])
    dist = vq_distances(flat, codebook, metric)
    best = dist.argmin(dim=1)
    return best.view(z.shape[:-1]), dist.gather(1, best[:, None])[:, 0].view(z.shape[:-1])


def vq_embed(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return codebook[indices]
