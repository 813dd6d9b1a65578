"""Padding helpers with flash-attn 2.8's ``flash_attn.bert_padding`` API: turn a padded
``(batch, seqlen, ...)`` batch into the packed ``(total, ...)`` layout of the varlen attention functions and
back.

Every function is differentiable in its tensor input (plain PyTorch indexing ops, so autograd,
``torch.compile`` and any device work). ``indices`` are int64 positions in the flattened ``batch * seqlen``
axis, ``cu_seqlens`` int32 ``(batch + 1,)`` cumulative lengths, as
:func:`cm3leon_kernels.flash_attn_varlen_func` takes them.
"""

from __future__ import annotations

import torch

from ._checks import as_int

__all__ = [
    "index_first_axis",
    "index_first_axis_residual",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]


def _check_indices(indices: object) -> torch.Tensor:
    # bool tensors are masks, not positions: index_select would refuse them with a less helpful error.
    if (
        not isinstance(indices, torch.Tensor)
        or indices.dim() != 1
        or indices.dtype.is_floating_point
        or indices.dtype.is_complex
        or indices.dtype == torch.bool
    ):
        raise TypeError(
            f"indices must be a 1-D integer tensor, got "
            f"{getattr(indices, 'dtype', type(indices).__name__)} {tuple(getattr(indices, 'shape', ()))}"
        )
    return indices


def _check_rows(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have a first (row) axis, got a 0-d tensor")
    return t


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along dim 0; the backward scatters into zeros. (flash-attn wants 2+ dims; 1-D works
    here too, e.g. token ids.)"""
    return _check_rows("input", input).index_select(0, _check_indices(indices))


def _count(name: str, x: object) -> int:
    n = as_int(name, x)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A zero tensor of ``first_axis_dim`` rows with ``values`` written at rows ``indices`` (the inverse of
    :func:`index_first_axis`)."""
    values, indices = _check_rows("values", values), _check_indices(indices)
    out = values.new_zeros((_count("first_axis_dim", first_axis_dim), *values.shape[1:]))
    # index_copy wants int64 positions; flash-attn also accepts int32 ones here.
    return out.index_copy(0, indices.long(), values)


class _IndexWithResidual(torch.autograd.Function):
    # The residual is ``input`` itself, returned detached so callers may modify it in place; its gradient
    # still flows back to ``input`` (added to the scattered gradient of the selected rows).
    @staticmethod
    def forward(ctx, input, indices):
        ctx.save_for_backward(indices)
        return input.index_select(0, indices), input.detach()

    @staticmethod
    def backward(ctx, grad_rows, grad_residual):
        (indices,) = ctx.saved_tensors
        return grad_residual.index_add(0, indices, grad_rows), None


def index_first_axis_residual(
    input: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input[indices], input)``: the selected rows plus ``input`` as a residual for a fused block."""
    return _IndexWithResidual.apply(_check_rows("input", input), _check_indices(indices))


def _check_mask(name: str, mask: object, hidden_states: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a (batch, seqlen) tensor, got {getattr(mask, 'shape', type(mask))}")
    if mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but hidden_states starts with "
            f"{tuple(hidden_states.shape[:2])}"
        )
    return mask


def _packed(hidden_states: torch.Tensor, indices: torch.Tensor, seqlens: torch.Tensor):
    cu_seqlens = torch.cat([seqlens.new_zeros(1), seqlens.cumsum(0, dtype=torch.int32)])
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return index_first_axis(hidden_states.flatten(0, 1), indices), indices, cu_seqlens, max_seqlen


def unpad_input(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None
):
    """Packs the valid tokens of a padded batch.

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)`` bool/int, nonzero = a valid token.
        unused_mask: optional ``(batch, seqlen)``, nonzero = a slot that is allocated but unused: packed too
            (counted in ``cu_seqlens``) but not in ``seqused``.

    Returns:
        ``(hidden_states (total, ...), indices (total,) int64, cu_seqlens (batch + 1,) int32, max_seqlen int,
        seqused (batch,) int32)``, as flash-attn 2.8.
    """
    hidden_states = _check_rows("hidden_states", hidden_states)
    valid = _check_mask("attention_mask", attention_mask, hidden_states).bool()
    used = valid.sum(-1, dtype=torch.int32)
    if unused_mask is not None:
        valid = valid | _check_mask("unused_mask", unused_mask, hidden_states).bool()
    indices = valid.flatten().nonzero().flatten()
    return *_packed(hidden_states, indices, valid.sum(-1, dtype=torch.int32)), used


def unpad_input_for_concatenated_sequences(
    hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor
):
    """Packs rows that each hold several documents back to back (left-aligned, then padding).

    ``attention_mask_in_length`` ``(batch, seqlen)`` int lists each row's document lengths in its first
    entries, zeros after (e.g. ``[[2, 3, 0, 0], [4, 0, 0, 0]]``); every document becomes its own sequence in
    ``cu_seqlens``, so documents of one row do not attend to each other.

    Returns:
        ``(hidden_states (total, ...), indices (total,), cu_seqlens (documents + 1,) int32, max_seqlen int)``.
    """
    hidden_states = _check_rows("hidden_states", hidden_states)
    lengths = _check_mask("attention_mask_in_length", attention_mask_in_length, hidden_states)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"attention_mask_in_length must hold integer lengths, got {lengths.dtype}")
    seqlen = hidden_states.shape[1]
    row_len = lengths.sum(-1)
    if bool((lengths < 0).any()) or bool((row_len > seqlen).any()):
        raise ValueError(
            f"attention_mask_in_length: each row's lengths must be >= 0 and sum to at most {seqlen}"
        )
    valid = torch.arange(seqlen, device=lengths.device) < row_len[:, None]
    indices = valid.flatten().nonzero().flatten()
    docs = lengths.flatten()
    return _packed(hidden_states, indices, docs[docs != 0].to(torch.int32))


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of :func:`unpad_input`: ``(total, ...)`` back to ``(batch, seqlen, ...)``, zeros at
    padding."""
    batch, seqlen = _count("batch", batch), _count("seqlen", seqlen)
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *out.shape[1:])
