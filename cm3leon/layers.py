"""Building blocks of the CM3Leon / Chameleon decoder: norms, rotary embeddings, feed-forward blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CM3LeonConfig


class LayerNorm(nn.Module):
    """LayerNorm over the last dim; without parameters when ``affine=False`` (the CM3Leon/OPT-paper choice)."""

    def __init__(self, dim: int, eps: float, affine: bool) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the scale (as Chameleon/Llama do)."""

    def __init__(self, dim: int, eps: float, affine: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed if self.weight is None else self.weight * normed


def make_norm(config: CM3LeonConfig) -> nn.Module:
    cls = LayerNorm if config.norm == "layernorm" else RMSNorm
    return cls(config.d_model, config.norm_eps, config.norm_affine)


class HeadNorm(nn.Module):
    """QK-norm: LayerNorm statistics over each head's dims, with a separate scale and shift per head."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., n_heads, head_dim]
        return F.layer_norm(x, (x.shape[-1],), None, None, self.eps) * self.weight + self.bias


class Rotary(nn.Module):
    """Rotary position embedding in the rotate-half convention (GPT-NeoX / Llama / Chameleon).

    The frequencies are recomputed in float32 on every call (head_dim/2 values) rather than kept as a buffer,
    so casting the model to bf16 or materialising it from the meta device cannot degrade them.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [..., seq, heads, head_dim] with positions [..., seq] (int)."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=x.device) / self.head_dim
        freqs = positions[..., None].float() * (1.0 / self.theta ** exponent)
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]  # broadcast over heads
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class FeedForward(nn.Module):
    """ReLU/GELU two-matrix FFN or the gated SwiGLU FFN; no biases."""

    def __init__(self, config: CM3LeonConfig) -> None:
        super().__init__()
        self.activation = config.activation
        d, h = config.d_model, config.hidden_dim
        self.up = nn.Linear(d, h, bias=False)
        self.gate = nn.Linear(d, h, bias=False) if config.activation == "swiglu" else None
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        act = F.relu if self.activation == "relu" else F.gelu
        return self.down(act(self.up(x)))
