"""The VQ codebook: a learned ``[K, D]`` parameter, the fused quantiser, usage tracking, dead-code restarts.

The codebook is an ``nn.Parameter`` trained by the optimizer through ``vector_quantize``'s codebook term
(not an EMA of assignments): the fused kernel's loss already carries that gradient, and restarts keep
every code in use. A code that no encoder output chose during the last ``restart_every`` steps is "dead";
:meth:`Codebook.restart_dead` moves it onto a randomly chosen recent encoder output (plus a little noise),
where it is immediately useful again.
"""
from __future__ import annotations

import torch
from torch import nn

from cm3leon_kernels import VQOutput, vector_quantize

__all__ = ["Codebook"]


class Codebook(nn.Module):
    """``K`` codes of dimension ``D`` with the fused nearest-code quantiser.

    Args:
        num_codes: K.
        dim: D.
        beta: commitment weight (``vector_quantize``'s ``beta``).
        metric: ``"l2"`` or ``"cosine"``.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, metric: str = "l2") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_codes, dim) / dim ** 0.5)
        self.beta = beta
        self.metric = metric
        # Assignments since the last restart; a buffer so it moves with .to() but is not saved.
        self.register_buffer("usage", torch.zeros(num_codes, dtype=torch.int64), persistent=False)

    @property
    def num_codes(self) -> int:
        return self.weight.shape[0]

    def forward(self, z: torch.Tensor) -> VQOutput:
        """Quantises channels-last ``z`` ``[..., D]``; in training mode also counts code usage."""
        out = vector_quantize(z.contiguous(), self.weight, beta=self.beta, metric=self.metric)
        if self.training:
            self.usage += torch.bincount(out.indices.reshape(-1), minlength=self.num_codes)
        return out

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``indices`` (``[...]`` -> ``[..., D]``)."""
        return self.weight[indices]

    def dead_codes(self, min_usage: int = 1) -> torch.Tensor:
        """Indices of codes used fewer than ``min_usage`` times since the last restart."""
        return torch.nonzero(self.usage < min_usage).reshape(-1)

    @torch.no_grad()
    def restart_dead(self, samples: torch.Tensor, min_usage: int = 1,
                     optimizer: torch.optim.Optimizer | None = None,
                     generator: torch.Generator | None = None) -> int:
        """Re-initialises dead codes from ``samples`` (recent encoder outputs ``[N, D]``), resets usage.

        Each dead code becomes a random sample plus noise of 1% of the samples' std, so several codes
        restarted onto the same sample still separate. If ``optimizer`` is given, its per-parameter state
        rows for the restarted codes (e.g. Adam's moments) are zeroed so stale momentum does not drag the
        code away. Returns the number of codes restarted.
        """
        if samples.ndim != 2 or samples.shape[1] != self.weight.shape[1] or samples.shape[0] == 0:
            raise ValueError(f"samples must be [N > 0, {self.weight.shape[1]}], got {tuple(samples.shape)}")
        dead = self.dead_codes(min_usage)
        if dead.numel():
            samples = samples.to(self.weight.dtype)
            pick = torch.randint(samples.shape[0], (dead.numel(),), generator=generator, device="cpu")
            noise = torch.randn(dead.numel(), samples.shape[1], generator=generator, device="cpu")
            new = samples[pick.to(samples.device)] + 0.01 * samples.std() * noise.to(samples.device)
            self.weight[dead] = new.to(self.weight.device)
            if optimizer is not None:
                for value in optimizer.state.get(self.weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == self.weight.shape:
                        value[dead] = 0
        self.usage.zero_()
        return int(dead.numel())
