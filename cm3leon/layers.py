"""Building blocks of the CM3Leon / Chameleon decoder: norms, rotary embeddings, feed-forward blocks, and the
fusion of projections that read the same input into one matrix."""
from __future__ import annotations

from collections.abc import Sequence

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


def fuse_linears(parent: nn.Module, names: Sequence[str], fused_name: str) -> list[int]:
    """Replaces the bias-free ``nn.Linear`` children ``names`` of ``parent`` (same input width) by one
    ``nn.Linear`` child ``fused_name`` whose rows are theirs stacked in order, so one matmul computes them all.

    The children become None. ``parent``'s state dict keeps the separate names (the checkpoint format does not
    change) and ``load_state_dict`` accepts them. Returns the output widths, for splitting the fused output.
    """
    linears = [getattr(parent, name) for name in names]
    sizes = [linear.out_features for linear in linears]
    weight = torch.cat([linear.weight.detach() for linear in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
    for name in names:
        setattr(parent, name, None)
    setattr(parent, fused_name, fused)

    def split(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        whole = state_dict.pop(f"{prefix}{fused_name}.weight")
        for name, part in zip(names, whole.split(sizes)):
            state_dict[f"{prefix}{name}.weight"] = part.clone()  # own storage: safetensors refuses shared ones

    def join(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        keys = [f"{prefix}{name}.weight" for name in names]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{fused_name}.weight"] = torch.cat([state_dict.pop(key) for key in keys])

    parent.register_state_dict_post_hook(split)
    parent.register_load_state_dict_pre_hook(join)
    return sizes


class TransposedLinear(nn.Module):
    """A bias-free linear layer that keeps its matrix as ``weight_t [in, out]`` and computes ``x @ weight_t``.

    Same function as the ``nn.Linear`` it replaces; the state dict still holds ``weight [out, in]``. Why: for
    the few-row inputs of decoding, MKL's float32 GEMM runs the ``[in, out]`` layout about twice as fast as
    ``nn.Linear``'s ``x @ weight.T`` (bfloat16 GEMMs are faster in the original layout).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("TransposedLinear replaces bias-free linear layers only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(),
                                     requires_grad=linear.weight.requires_grad)
        self.register_state_dict_post_hook(_standard_layout)
        self.register_load_state_dict_pre_hook(_transposed_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight_t)


def _standard_layout(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict[f"{prefix}weight"] = state_dict.pop(f"{prefix}weight_t").t().contiguous()


def _transposed_layout(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    if f"{prefix}weight" in state_dict:
        state_dict[f"{prefix}weight_t"] = state_dict.pop(f"{prefix}weight").t().contiguous()


def transpose_linears(parent: nn.Module) -> None:
    """Replaces the bias-free ``nn.Linear`` children of ``parent`` by :class:`TransposedLinear` (idempotent)."""
    for name, child in list(parent.named_children()):
        if type(child) is nn.Linear and child.bias is None:
            setattr(parent, name, TransposedLinear(child))


class FeedForward(nn.Module):
    """ReLU/GELU two-matrix FFN or the gated SwiGLU FFN; no biases."""

    def __init__(self, config: CM3LeonConfig) -> None:
        super().__init__()
        self.activation = config.activation
        d, h = config.d_model, config.hidden_dim
        self.up = nn.Linear(d, h, bias=False)
        self.gate = nn.Linear(d, h, bias=False) if config.activation == "swiglu" else None
        self.down = nn.Linear(h, d, bias=False)
        self.gate_up: nn.Linear | None = None  # gate and up in one matrix after fuse_projections()

    def fuse_projections(self) -> None:
        """Computes the gated FFN's two input projections with one matmul (no-op for two-matrix FFNs)."""
        if self.gate is not None:
            fuse_linears(self, ("gate", "up"), "gate_up")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        act = F.relu if self.activation == "relu" else F.gelu
        return self.down(act(self.up(x)))
