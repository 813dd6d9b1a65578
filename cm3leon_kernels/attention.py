"""Fused attention, FlashAttention-compatible: swap ``from flash_attn import ...`` for
``from cm3leon_kernels import ...``.

Layout ``(batch, seqlen, nheads, headdim)``; k/v may have fewer heads than q (GQA/MQA). The CPU kernel is a
tiled online softmax (it never builds the ``seqlen_q x seqlen_k`` score matrix) with fp32 accumulation for
float32, bfloat16 and float16 inputs; the backward recomputes probabilities from the saved log-sum-exp.
Causal masks align to the bottom-right corner when ``seqlen_q != seqlen_k`` (FlashAttention >= 2.1): query
``i`` sees keys ``j <= i + seqlen_k - seqlen_q``; a query that sees no key gets output 0 and lse ``-inf``.

On CUDA (builds with CUDA): a FlashAttention-2-style tensor-core forward for bfloat16/float16, a slow SIMT
path for float32, and split-KV decode for the KV cache; see docs/attention.md ("CUDA").
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

from ._checks import as_int, check_fake_devices
from ._native import cuda_built, ops

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# CUDA: forward, varlen and KV-cache kernels when the extension was built with CUDA (csrc/attention/*cuda*).
_DEVICES = ("cpu", "cuda") if cuda_built() else ("cpu",)
_kvcache_op = ops.flash_attn_kvcache.default  # resolved once: decode calls it per token per layer


# ---- cheap argument checks (decode calls these once per token per layer) ----------------------------------

def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, names=("q", "k", "v")) -> None:
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), "
                             f"got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {q.device}: use one device")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{names[0]} must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{names[0]}, {names[1]}, {names[2]} must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if q.device.type not in _DEVICES:
        raise NotImplementedError(f"{names[0]} is on {q.device}; attention has kernels for "
                                  f"{', '.join(_DEVICES)} only")
    if k.shape != v.shape:
        raise ValueError(f"{names[1]} and {names[2]} must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    d, hq, hkv = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"{names[1]}'s head dim ({k.shape[-1]}) must equal {names[0]}'s ({d})")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{names[0]}'s head count ({hq}) must be a multiple of {names[1]}'s ({hkv})")
    if not 1 <= d <= 256:
        raise ValueError(f"head dim must be in [1, 256], got {d}")


def _scale(softmax_scale: float | None, q: torch.Tensor) -> float:
    if softmax_scale is None:
        return q.shape[-1] ** -0.5
    if type(softmax_scale) is not float and (isinstance(softmax_scale, bool)
                                             or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be a number or None, got {type(softmax_scale).__name__}")
    scale = float(softmax_scale)
    if not math.isfinite(scale):  # NaN/inf would silently zero the output (the kernels skip NaN scores)
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    return scale


def _not_a_tensor(required: dict[str, object], optional: dict[str, object]) -> TypeError:
    """The error for the first argument that is not a tensor (``optional`` ones may also be None)."""
    bad = [(n, a) for n, a in required.items() if not isinstance(a, torch.Tensor)] + \
        [(n, a) for n, a in optional.items() if a is not None and not isinstance(a, torch.Tensor)]
    name, value = bad[0]
    return TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (CM3Leon trains without attention dropout), got {dropout_p}")


def _check_cu_seqlens(name: str, cu: torch.Tensor, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}: use one device")


def _contiguous(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Only the last dim must be dense for users (as in FlashAttention); the kernel wants token-major rows.
    return tuple(t if t.is_contiguous() else t.contiguous() for t in ts)


# ---- public API ------------------------------------------------------------------------------------------

def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False, return_lse: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused scaled-dot-product attention; differentiable in q, k, v.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, float32 / bfloat16 / float16; headdim a multiple of 8,
            at most 256.
        k, v: ``(batch, seqlen_k, nheads_kv, headdim)``, same dtype and device; ``nheads % nheads_kv == 0``.
        dropout_p: must be 0.0 (no attention dropout).
        softmax_scale: scale of ``q·k`` before the softmax; default ``headdim ** -0.5``.
        causal: bottom-right aligned causal mask.
        return_lse: also return the log-sum-exp ``(batch, nheads, seqlen_q)`` float32 (not differentiable).

    Returns:
        ``out`` of q's shape and dtype, or ``(out, lse)`` when ``return_lse``.

    Raises:
        TypeError / ValueError naming the argument (dtype or shape mismatch, head counts, dropout_p > 0,
        last dim not contiguous); NotImplementedError for devices without a kernel.
    """
    _check_qkv(q, k, v, 4)
    _check_dropout(dropout_p)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k's batch ({k.shape[0]}) must equal q's ({q.shape[0]})")
    q, k, v = _contiguous(q, k, v)
    out, lse = ops.flash_attn_forward(q, k, v, _scale(softmax_scale, q), bool(causal))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed documents; differentiable in q, k, v.

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_kv, headdim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` cumulative document lengths starting at 0 and
            ending at total_q / total_k; documents may be empty. Document ``b`` of q attends only to
            document ``b`` of k (causal masks align per document).
        max_seqlen_q, max_seqlen_k: upper bounds of the document lengths (checked).
        dropout_p, softmax_scale, causal: as :func:`flash_attn_func`.
        return_lse: also return the log-sum-exp ``(nheads, total_q)`` float32.

    Raises:
        As :func:`flash_attn_func`; ValueError naming ``cu_seqlens_q`` / ``cu_seqlens_k`` when they do not
        start at 0, decrease, exceed max_seqlen or do not end at the token count.
    """
    _check_qkv(q, k, v, 3)
    _check_dropout(dropout_p)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    q, k, v, cu_seqlens_q, cu_seqlens_k = _contiguous(q, k, v, cu_seqlens_q, cu_seqlens_k)
    max_seqlen_q, max_seqlen_k = as_int("max_seqlen_q", max_seqlen_q), as_int("max_seqlen_k", max_seqlen_k)
    out, lse = ops.flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             _scale(softmax_scale, q), bool(causal))
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            cache_seqlens: torch.Tensor | int | None = None,
                            softmax_scale: float | None = None, causal: bool = True,
                            return_softmax_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention against a preallocated KV cache (generation); not differentiable.

    If ``k``/``v`` ``(batch, seqlen_new, nheads_kv, headdim)`` are given they are written into ``k_cache``/
    ``v_cache`` ``(batch, seqlen_cache, nheads_kv, headdim)`` **in place** at positions
    ``cache_seqlens[b] ...`` of each row; then q ``(batch, seqlen_q, nheads, headdim)`` attends to the first
    ``cache_seqlens[b] + seqlen_new`` positions. ``cache_seqlens`` (an int, or int32 ``(batch,)``) is not
    modified: advance it yourself. ``None`` means the whole cache is valid. Decode (``seqlen_q == 1``) splits
    the key range across cores and merges the partial results by their log-sum-exp.

    With ``return_softmax_lse=True`` (FlashAttention's name) returns ``(out, lse)``, lse float32
    ``(batch, nheads, seqlen_q)`` in natural log units (``-inf`` for a query that sees no key).

    Raises:
        TypeError / ValueError naming the argument, including ``cache_seqlens`` when new tokens would overflow
        the cache.
    """
    # Decode calls this once per token per layer, so only what C++ cannot see is checked here (devices:
    # mixed devices would dispatch elsewhere; the cache_seqlens form); shapes, dtypes, contiguity and
    # overflow are checked by the C++ launcher, whose errors name the arguments.
    try:
        dev = q.device
        mixed = k_cache.device != dev or v_cache.device != dev or (k is not None and k.device != dev) or \
            (v is not None and v.device != dev)
    except AttributeError:
        raise _not_a_tensor({"q": q, "k_cache": k_cache, "v_cache": v_cache}, {"k": k, "v": v}) from None
    if mixed:
        raise ValueError(f"q, k_cache, v_cache, k, v must be on one device, got {dev}, {k_cache.device}, "
                         f"{v_cache.device}, {None if k is None else k.device}, "
                         f"{None if v is None else v.device}")
    if dev.type not in _DEVICES:
        raise NotImplementedError(f"q is on {dev}; attention has kernels for {', '.join(_DEVICES)} only")
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.device != dev:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {dev}: use one device")
        seqlens, scalar = cache_seqlens, 0
    elif cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending k/v (None means the cache is full)")
        seqlens, scalar = None, k_cache.shape[1]
    elif type(cache_seqlens) is int:
        seqlens, scalar = None, cache_seqlens
    elif hasattr(type(cache_seqlens), "__index__") and not isinstance(cache_seqlens, bool):
        seqlens, scalar = None, operator.index(cache_seqlens)  # e.g. numpy.int64
    else:
        raise TypeError("cache_seqlens must be an int or an int32 tensor, "
                        f"got {type(cache_seqlens).__name__}")
    if not q.is_contiguous():
        q = q.contiguous()
    scale = _scale(softmax_scale, q)
    out, lse = _kvcache_op(q, k_cache, v_cache, k, v, seqlens, scalar, scale, bool(causal))
    return (out, lse) if return_softmax_lse else out


# ---- torch.library registration: fake (meta) kernels for tracing, autograd -------------------------------

# The trailing arguments of the four forward/backward ops (window_left, window_right, softcap, alibi_slopes,
# deterministic) do not change output shapes; alibi_slopes joins the device check.

@torch.library.register_fake("cm3leon::flash_attn_forward")
def _forward_fake(q, k, v, softmax_scale, causal, window_left=-1, window_right=-1, softcap=0.0,
                  alibi_slopes=None, deterministic=False):
    check_fake_devices("flash_attn_forward", q=q, k=k, v=v, alibi_slopes=alibi_slopes)
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("cm3leon::flash_attn_backward")
def _backward_fake(dout, q, k, v, out, lse, softmax_scale, causal, window_left=-1, window_right=-1,
                   softcap=0.0, alibi_slopes=None, deterministic=False):
    check_fake_devices("flash_attn_backward", dout=dout, q=q, k=k, v=v, out=out, lse=lse,
                       alibi_slopes=alibi_slopes)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("cm3leon::flash_attn_varlen_forward")
def _varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                         causal, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False):
    check_fake_devices("flash_attn_varlen_forward", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                       cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("cm3leon::flash_attn_varlen_backward")
def _varlen_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_left=-1, window_right=-1, softcap=0.0,
                          alibi_slopes=None, deterministic=False):
    check_fake_devices("flash_attn_varlen_backward", dout=dout, q=q, k=k, v=v, out=out, lse=lse,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("cm3leon::flash_attn_kvcache")
def _kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, cache_seqlen, softmax_scale, causal, window_left=-1,
                  window_right=-1, softcap=0.0, alibi_slopes=None, rotary_cos=None, rotary_sin=None,
                  rotary_interleaved=True, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                  num_splits=0):
    check_fake_devices("flash_attn_kvcache", q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                       cache_seqlens=cache_seqlens, alibi_slopes=alibi_slopes, rotary_cos=rotary_cos,
                       rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                       block_table=block_table)
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    # Everything after q, k, v maps 1:1 onto the backward op's trailing arguments: (softmax_scale, causal,
    # window_left, window_right, softcap, alibi_slopes, deterministic), varlen with cu_seqlens and max_seqlens
    # first.
    ctx.args = inputs[3:]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ops.flash_attn_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ops.flash_attn_varlen_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


torch.library.register_autograd("cm3leon::flash_attn_forward", _backward, setup_context=_setup)
torch.library.register_autograd("cm3leon::flash_attn_varlen_forward", _varlen_backward, setup_context=_setup)
