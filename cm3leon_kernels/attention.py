"""Fused attention ops (``torch.ops.cm3leon.flash_attn_*``): the argument checks shared by the public
functions in :mod:`cm3leon_kernels.flash_attn_interface` (FlashAttention 2.8's API), and the ops' fake and
autograd registration.

Layout ``(batch, seqlen, nheads, headdim)``; k/v may have fewer heads than q (GQA/MQA). The CPU kernel is a
tiled online softmax (it never builds the ``seqlen_q x seqlen_k`` score matrix) with fp32 accumulation for
float32, bfloat16 and float16 inputs; the backward recomputes probabilities from the saved log-sum-exp.
Causal masks align to the bottom-right corner when ``seqlen_q != seqlen_k`` (FlashAttention >= 2.1): query
``i`` sees keys ``j <= i + seqlen_k - seqlen_q``; a query that sees no key gets output 0 and lse ``-inf``.
Attention dropout (``dropout_p > 0``, CPU only) drops probabilities with a counter-based Philox mask keyed by
a seed drawn here (:func:`_dropout_seed`), which the backward regenerates (docs/attention.md, "Dropout").

On CUDA (builds with CUDA): a FlashAttention-2-style tensor-core forward for bfloat16/float16, a slow SIMT
path for float32, and split-KV decode for the KV cache; see docs/attention.md ("CUDA").
"""
from __future__ import annotations

import numbers

import torch

from ._checks import as_float, check_fake_devices, is_finite
from ._native import cuda_built, ops

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
    if not is_finite(scale):  # NaN/inf would silently zero the output (the kernels skip NaN scores)
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    return scale


def _not_a_tensor(required: dict[str, object], optional: dict[str, object]) -> TypeError:
    """The error for the first argument that is not a tensor (``optional`` ones may also be None)."""
    bad = [(n, a) for n, a in required.items() if not isinstance(a, torch.Tensor)] + \
        [(n, a) for n, a in optional.items() if a is not None and not isinstance(a, torch.Tensor)]
    name, value = bad[0]
    return TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_dropout(dropout_p: float) -> float:
    """dropout_p as a float in [0, 1) (FlashAttention's rule: a probability, not a bool)."""
    p = as_float("dropout_p", dropout_p)
    if not (is_finite(p) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be a finite number in [0, 1), got {dropout_p!r}")
    return p


def _dropout_seed(dropout_p: float) -> torch.Tensor | None:
    """The seed of a call's dropout mask: one int64 drawn from torch's default CPU generator (so
    ``torch.manual_seed`` reproduces a run), a tensor so that ``torch.compile`` traces the draw; None (and
    nothing drawn) without dropout. The backward reuses it to regenerate the mask."""
    if dropout_p == 0.0:
        return None
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)  # out of place: dynamo traces it


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


# ---- torch.library registration: fake (meta) kernels for tracing, autograd -------------------------------

# The trailing arguments of the four forward/backward ops (window_left, window_right, softcap, alibi_slopes,
# deterministic, dropout_p, dropout_seed) do not change output shapes; alibi_slopes joins the device check,
# dropout_seed may be on the CPU beside tensors on another device.

_SEED_CPU = ("dropout_seed",)


@torch.library.register_fake("cm3leon::flash_attn_forward")
def _forward_fake(q, k, v, softmax_scale, causal, window_left=-1, window_right=-1, softcap=0.0,
                  alibi_slopes=None, deterministic=False, dropout_p=0.0, dropout_seed=None):
    check_fake_devices("flash_attn_forward", _SEED_CPU, q=q, k=k, v=v, alibi_slopes=alibi_slopes,
                       dropout_seed=dropout_seed)
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("cm3leon::flash_attn_backward")
def _backward_fake(dout, q, k, v, out, lse, softmax_scale, causal, window_left=-1, window_right=-1,
                   softcap=0.0, alibi_slopes=None, deterministic=False, dropout_p=0.0, dropout_seed=None):
    check_fake_devices("flash_attn_backward", _SEED_CPU, dout=dout, q=q, k=k, v=v, out=out, lse=lse,
                       alibi_slopes=alibi_slopes, dropout_seed=dropout_seed)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("cm3leon::flash_attn_varlen_forward")
def _varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                         causal, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False, dropout_p=0.0, dropout_seed=None):
    check_fake_devices("flash_attn_varlen_forward", _SEED_CPU, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                       cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes, dropout_seed=dropout_seed)
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("cm3leon::flash_attn_varlen_backward")
def _varlen_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_left=-1, window_right=-1, softcap=0.0,
                          alibi_slopes=None, deterministic=False, dropout_p=0.0, dropout_seed=None):
    check_fake_devices("flash_attn_varlen_backward", _SEED_CPU, dout=dout, q=q, k=k, v=v, out=out, lse=lse,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes,
                       dropout_seed=dropout_seed)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("cm3leon::flash_attn_dropout_mask")
def _dropout_mask_fake(dropout_seed, batch, nheads, seqlen_q, seqlen_k, dropout_p):
    return dropout_seed.new_empty((batch, nheads, seqlen_q, seqlen_k), dtype=torch.bool)


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
    # window_left, window_right, softcap, alibi_slopes, deterministic, dropout_p, dropout_seed), varlen with
    # cu_seqlens and max_seqlens first. The seed makes the backward regenerate the forward's dropout mask.
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
