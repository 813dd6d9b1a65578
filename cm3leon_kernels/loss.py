"""Fused linear + cross-entropy: the loss of a language-model head without materialising its logits.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(F.linear(hidden, weight), targets)`` (with per-token weights, label smoothing, z-loss and
logit soft-capping), but the ``[T, V]`` logits and their gradient never exist in memory: the kernel walks the
vocabulary in blocks with an online log-sum-exp, and, when a gradient will be needed, turns each chunk of
logits into its gradient contributions while the chunk is in memory. See docs/loss.md.
"""
from __future__ import annotations

import math

import torch

from ._checks import (FLOAT_DTYPES, as_float, as_int, check_contiguous, check_fake_devices, check_same_device,
                      check_supported_device, check_tensor)
from ._native import ops

__all__ = ["linear_cross_entropy", "linear_cross_entropy_supports"]

_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_DEVICES = ("cpu",)  # the CUDA kernel is compile-checked only (docs/loss.md, "CUDA")
_FLOAT32_MAX = 3.4028234663852886e38


def _real(name: str, x: object, *, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    """x as a float: a real number (not a bool) in [lo, hi] (or (lo, hi]), finite as float32."""
    value = as_float(name, x)
    if not (abs(value) <= _FLOAT32_MAX and (value > lo or (value == lo and not lo_open)) and value <= hi):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{lo}, {hi}], got {x!r}")
    return value


def linear_cross_entropy_supports(weight: torch.Tensor) -> bool:
    """Whether :func:`linear_cross_entropy` has a kernel for a head ``weight`` of this device and dtype."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    return weight.device.type in _DEVICES and weight.dtype in FLOAT_DTYPES


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         loss_weights: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, return_lse: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without forming the logits.

    Per token ``t`` with logits ``z = hidden[t] @ weight.T`` (soft-capped first when ``softcap`` is given:
    ``z <- softcap * tanh(z / softcap)``), ``lse = logsumexp(z)`` and ``ε = label_smoothing``:
    ``ℓ_t = (1 − ε)(lse − z[y_t]) + ε (lse − mean(z)) + z_loss · lse²`` — exactly ``F.cross_entropy``'s
    loss with label smoothing, plus the z-loss. Tokens whose target is ``ignore_index`` contribute 0.

    Args:
        hidden: ``[T, D]`` float32 / bfloat16 / float16, contiguous.
        weight: ``[V, D]`` (the output head, e.g. the tied embedding), hidden's dtype and device.
        targets: int64 ``[T]`` in ``[0, V)`` or ``ignore_index``.
        loss_weights: optional ``[T]`` finite, non-negative per-token weights ``w`` (default 1).
        ignore_index: target value that is skipped.
        reduction: ``"mean"`` (``Σ w·ℓ / Σ w`` over non-ignored tokens, 0 when that sum is 0), ``"sum"``
            (``Σ w·ℓ``) or ``"none"`` (float32 ``[T]`` of ``w·ℓ``, 0 where ignored).
        label_smoothing: in ``[0, 1]``.
        z_loss: ``≥ 0``; adds ``z_loss · lse²`` to every non-ignored token's loss (weighted like it).
        softcap: ``None`` or ``> 0``.
        return_lse: also return the float32 ``[T]`` log-sum-exp of every token (after soft-capping; not
            differentiable).

    Returns:
        The float32 loss (scalar, or ``[T]`` for ``"none"``), and ``lse`` when ``return_lse``.
        Differentiable in ``hidden`` and ``weight`` (gradients in their dtypes).

    Raises:
        TypeError / ValueError naming the argument for wrong types, shapes, dtypes, devices, non-contiguous
        tensors and bad scalars; ``IndexError`` for targets outside ``[0, V)`` that are not ``ignore_index``;
        ``ValueError`` for negative or non-finite ``loss_weights`` and for NaN/inf in ``hidden`` or ``weight``
        (a non-finite log-sum-exp); ``NotImplementedError`` on devices without a kernel.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("targets", targets, dtypes=(torch.int64,), ndim=1)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be a non-empty [V, D] matrix, got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim ({hidden.shape[1]}) must equal weight's D ({weight.shape[1]})")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be [T] with T = {hidden.shape[0]} (hidden's rows), got "
                         f"{tuple(targets.shape)}")
    if loss_weights is not None:
        check_tensor("loss_weights", loss_weights, dtypes=FLOAT_DTYPES, ndim=1)
        if loss_weights.shape[0] != hidden.shape[0]:
            raise ValueError(f"loss_weights must be [T] with T = {hidden.shape[0]}, got "
                             f"{tuple(loss_weights.shape)}")
        check_same_device(hidden=hidden, weight=weight, targets=targets, loss_weights=loss_weights)
        check_contiguous("loss_weights", loss_weights)
        loss_weights = loss_weights.detach().float()
    else:
        check_same_device(hidden=hidden, weight=weight, targets=targets)
    check_supported_device("hidden", hidden, _DEVICES)
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check_contiguous(name, t)
    ignore_index = as_int("ignore_index", ignore_index)
    if not -(2**63) <= ignore_index < 2**63:  # the op's int64 argument (targets are int64 too)
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(_REDUCTIONS)}, got {reduction!r}")
    label_smoothing = _real("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    z_loss = _real("z_loss", z_loss, lo=0.0)
    softcap = 0.0 if softcap is None else _real("softcap", softcap, lo=0.0, lo_open=True)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    code = _REDUCTIONS[reduction]
    # Gradients are computed in the forward pass when a reduced loss will be differentiated (docs/loss.md).
    compute_grad = code != 0 and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, lse, _, _ = ops.linear_cross_entropy_forward(hidden, weight, targets, loss_weights, ignore_index,
                                                       label_smoothing, z_loss, softcap, code, compute_grad)
    return (loss, lse.detach()) if return_lse else loss


# ---- torch.library registration: fake (meta) kernels for tracing, autograd ------------------------------

@torch.library.register_fake("cm3leon::linear_cross_entropy_forward")
def _forward_fake(hidden, weight, targets, loss_weights, ignore_index, label_smoothing, z_loss, softcap,
                  reduction, compute_grad):
    check_fake_devices("linear_cross_entropy_forward", hidden=hidden, weight=weight, targets=targets,
                       loss_weights=loss_weights)
    tokens = hidden.shape[0]
    loss = hidden.new_empty((tokens,) if reduction == 0 else (), dtype=torch.float32)
    lse = hidden.new_empty((tokens,), dtype=torch.float32)
    if compute_grad:
        return loss, lse, torch.empty_like(hidden), torch.empty_like(weight)
    return loss, lse, hidden.new_empty((0,)), weight.new_empty((0,))


@torch.library.register_fake("cm3leon::linear_cross_entropy_backward")
def _backward_fake(grad_loss, hidden, weight, targets, loss_weights, lse, ignore_index, label_smoothing, z_loss,
                   softcap):
    check_fake_devices("linear_cross_entropy_backward", grad_loss=grad_loss, hidden=hidden, weight=weight,
                       targets=targets, loss_weights=loss_weights, lse=lse)
    return torch.empty_like(hidden), torch.empty_like(weight)


def _eager(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain tensor outside any tracing (no FakeTensor/FunctionalTensor, no dispatch mode)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and \
        torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None


def _setup(ctx, inputs, output):
    hidden, weight, targets, loss_weights, ignore_index, label_smoothing, z_loss, softcap, reduction, \
        compute_grad = inputs
    _, lse, grad_hidden, grad_weight = output
    # Autograd would otherwise pass zero tensors as the gradients of the unused outputs (grad_hidden and
    # grad_weight themselves): a transient [V, D] allocation in every backward.
    ctx.set_materialize_grads(False)
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap)
    ctx.reduction, ctx.compute_grad = reduction, compute_grad
    ctx.has_weights = loss_weights is not None
    saved = (grad_hidden, grad_weight) if compute_grad else (hidden, weight, targets, lse)
    ctx.save_for_backward(*saved, *((loss_weights,) if ctx.has_weights else ()))


def _backward(ctx, grad_loss, grad_lse, grad_grad_hidden, grad_grad_weight):
    no_grads = (None,) * 8
    if grad_loss is None:  # only lse was used, which is not differentiable
        return (None, None, *no_grads)
    if ctx.compute_grad:
        # The forward already computed the gradients of the reduced loss: scale them, in place when running
        # eagerly (a [V, D] copy would add the size of the weight to the peak; a second backward through the
        # same graph, retain_graph=True, then raises autograd's "modified by an inplace operation" error).
        # Traced graphs (torch.compile, AOT) get the out-of-place product: they must not mutate saved outputs.
        grad_hidden, grad_weight = ctx.saved_tensors[:2]
        scale_h, scale_w = grad_loss.to(grad_hidden.dtype), grad_loss.to(grad_weight.dtype)
        if _eager(grad_weight):
            return grad_hidden.mul_(scale_h), grad_weight.mul_(scale_w), *no_grads
        return grad_hidden * scale_h, grad_weight * scale_w, *no_grads
    hidden, weight, targets, lse = ctx.saved_tensors[:4]
    loss_weights = ctx.saved_tensors[4] if ctx.has_weights else None
    per_token = grad_loss.float()
    if ctx.reduction != 0:  # the forward ran without gradients (e.g. a raw call): recompute them
        per_token = per_token.expand(targets.shape[0])
        if ctx.reduction == 2:
            valid = (targets != ctx.args[0]).float()
            total = (valid if loss_weights is None else valid * loss_weights).sum()
            per_token = per_token / torch.where(total > 0, total, torch.ones_like(total))
    grad_hidden, grad_weight = ops.linear_cross_entropy_backward(per_token.contiguous(), hidden, weight, targets,
                                                                 loss_weights, lse, *ctx.args)
    return (grad_hidden, grad_weight, *no_grads)


torch.library.register_autograd("cm3leon::linear_cross_entropy_forward", _backward, setup_context=_setup)
