"""FlashAttention 2.8's public attention functions, with its signatures: swap ``from flash_attn import ...``
(or ``flash_attn.flash_attn_interface``) for ``from cm3leon_kernels import ...``.

Same names, positional order, defaults and return values as flash-attn 2.8; see docs/attention.md for the
semantics (masks, windows, softcap, ALiBi, dropout, KV cache) and the few documented differences (``S_dmask``
is ``None`` without dropout and holds one key block, dropout is CPU-only, a query that sees no key has lse
``-inf``). Our extra, ``return_lse``, is
keyword-only and comes last. Argument checks live in :mod:`cm3leon_kernels.attention` beside the op
registration; the C++ launchers check the rest (their errors name the argument too).
"""

from __future__ import annotations

import operator

import torch

from ._checks import as_float, as_int, is_finite
from ._native import ops
from ._s_dmask import dense_s_dmask, varlen_s_dmask
from .attention import (
    _DEVICES,
    _check_cu_seqlens,
    _check_dropout,
    _check_qkv,
    _contiguous,
    _dropout_seed,
    _kvcache_op,
    _not_a_tensor,
    _scale,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

_NO_WINDOW = (-1, -1)


# ---- argument normalisation (FlashAttention's rules) -----------------------------------------------------


def _window_side(name: str, x: object) -> int:
    try:
        if isinstance(x, bool):
            raise TypeError
        return operator.index(x)  # ints, numpy ints, one-element integer tensors (FA's tests pass randint)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {x!r}") from None


def _window(window_size: object, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """(left, right) as the kernels take them: -1 = unbounded; causal is right = 0."""
    if window_size is _NO_WINDOW or (type(window_size) is tuple and window_size == _NO_WINDOW):
        left, right = -1, -1
    else:
        try:
            left, right = window_size
        except (TypeError, ValueError):
            raise TypeError(
                f"window_size must be a pair (left, right) of ints, got {window_size!r}"
            ) from None
        left, right = _window_side("window_size[0]", left), _window_side("window_size[1]", right)
        # As FlashAttention: a side reaching seqlen_k keys or more is unbounded (this matters when
        # seqlen_q > seqlen_k, where a finite right window would still hide keys from the top rows).
        left = -1 if left < 0 or left >= seqlen_k else left
        right = -1 if right < 0 or right >= seqlen_k else right
    return (left, 0) if causal else (left, right)


def _softcap(softcap: object) -> float:
    if type(softcap) is float and softcap == 0.0:
        return 0.0
    cap = as_float("softcap", softcap)
    if not is_finite(cap):
        raise ValueError(f"softcap must be finite, got {softcap!r}")
    return max(cap, 0.0)  # FlashAttention: softcap <= 0 means no capping


def _check_alibi(alibi_slopes: object) -> None:
    # The op's schema would refuse a list or a number with a dispatcher RuntimeError instead.
    if alibi_slopes is not None and not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(
            f"alibi_slopes must be a float32 torch.Tensor or None, got {type(alibi_slopes).__name__}"
        )


def _results(out: torch.Tensor, lse: torch.Tensor, s_dmask, return_attn_probs: bool, return_lse: bool):
    if return_attn_probs and return_lse:
        raise ValueError(
            "return_attn_probs and return_lse are exclusive (return_attn_probs already returns lse)"
        )
    if return_attn_probs:
        # FA returns S_dmask for testing dropout; with dropout_p == 0 there is no mask and it is None.
        return out, lse, s_dmask
    return (out, lse) if return_lse else out


def _unpack(name: str, packed: object, n: int, ndim: int) -> tuple[torch.Tensor, ...]:
    """Views q/k/v of a packed tensor (``n`` along dim -3); autograd sums their gradients into ``packed``."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != ndim or packed.shape[-3] != n:
        dims = "(batch, seqlen, " if ndim == 5 else "(total, "
        raise ValueError(f"{name} must be {dims}{n}, nheads, headdim), got shape {tuple(packed.shape)}")
    return packed.unbind(-3)


# ---- shared bodies --------------------------------------------------------------------------------------


def _dense(
    q,
    k,
    v,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    return_attn_probs,
    return_lse,
    names=("q", "k", "v"),
):
    """The public functions' result (see _results); S_dmask is None unless dropout_p > 0."""
    _check_qkv(q, k, v, 4, names)
    _check_alibi(alibi_slopes)
    p = _check_dropout(dropout_p)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{names[1]}'s batch ({k.shape[0]}) must equal {names[0]}'s ({q.shape[0]})")
    q, k, v = _contiguous(q, k, v)
    causal = bool(causal)
    left, right = _window(window_size, causal, k.shape[1])
    scale, cap, seed = _scale(softmax_scale, q), _softcap(softcap), _dropout_seed(p)
    out, lse = ops.flash_attn_forward(
        q,
        k,
        v,
        scale,
        causal,
        window_left=left,
        window_right=right,
        softcap=cap,
        alibi_slopes=alibi_slopes,
        deterministic=bool(deterministic),
        dropout_p=p,
        dropout_seed=seed,
    )
    s_dmask = None
    if return_attn_probs and p > 0:
        s_dmask = dense_s_dmask(q, k, seed, p, scale, (left, right), cap, alibi_slopes)
    return _results(out, lse, s_dmask, return_attn_probs, return_lse)


def _paged_keys(k, v, block_table, cu_seqlens_k):
    """Gathers the pages of a paged k/v ``(num_blocks, page_block_size, nheads_kv, headdim)`` into the packed
    ``(total_k, nheads_kv, headdim)`` layout of the varlen op (a differentiable gather)."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be (num_blocks, page_block_size, nheads_kv, headdim) with a "
                f"block_table, got {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        # Both are gathered with k's page size and block count: a v of another layout would be misread.
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (
        not isinstance(block_table, torch.Tensor)
        or block_table.dtype != torch.int32
        or block_table.dim() != 2
    ):
        raise TypeError(
            f"block_table must be an int32 (batch, max_num_blocks_per_seq) tensor, got "
            f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
            f"{tuple(getattr(block_table, 'shape', ()))}"
        )
    if block_table.device != k.device:
        raise ValueError(f"block_table is on {block_table.device} but k is on {k.device}: use one device")
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.device)
    if block_table.shape[0] != cu_seqlens_k.shape[0] - 1:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows but cu_seqlens_k describes "
            f"{cu_seqlens_k.shape[0] - 1} documents"
        )
    page, num_blocks = k.shape[1], k.shape[0]
    cu = cu_seqlens_k.long()
    lens = cu.diff()
    if bool((lens < 0).any()) or (lens.numel() and int(lens.max()) > block_table.shape[1] * page):
        raise ValueError(
            f"cu_seqlens_k has a document longer than block_table's {block_table.shape[1]} "
            f"pages of {page} keys (or decreases)"
        )
    doc = torch.repeat_interleave(torch.arange(lens.numel(), device=k.device), lens)
    pos = torch.arange(doc.numel(), device=k.device) - cu[doc]
    blocks = block_table[doc, pos // page].long()
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= num_blocks):
        raise ValueError(f"block_table holds block indices outside [0, {num_blocks}) for used positions")
    slots = blocks * page + pos % page
    return k.flatten(0, 1).index_select(0, slots), v.flatten(0, 1).index_select(0, slots)


def _varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    return_attn_probs,
    return_lse,
    names=("q", "k", "v"),
):
    """As :func:`_dense` for packed documents."""
    _check_qkv(q, k, v, 3, names)
    _check_alibi(alibi_slopes)
    p = _check_dropout(dropout_p)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    q, k, v, cu_seqlens_q, cu_seqlens_k = _contiguous(q, k, v, cu_seqlens_q, cu_seqlens_k)
    max_seqlen_q, max_seqlen_k = as_int("max_seqlen_q", max_seqlen_q), as_int("max_seqlen_k", max_seqlen_k)
    causal = bool(causal)
    left, right = _window(window_size, causal, max_seqlen_k)
    scale, cap, seed = _scale(softmax_scale, q), _softcap(softcap), _dropout_seed(p)
    out, lse = ops.flash_attn_varlen_forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        causal,
        window_left=left,
        window_right=right,
        softcap=cap,
        alibi_slopes=alibi_slopes,
        deterministic=bool(deterministic),
        dropout_p=p,
        dropout_seed=seed,
    )
    s_dmask = None
    if return_attn_probs and p > 0:
        s_dmask = varlen_s_dmask(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, p, scale,
                                 (left, right), cap, alibi_slopes)
    return _results(out, lse, s_dmask, return_attn_probs, return_lse)


# ---- public API (FlashAttention 2.8 signatures) ---------------------------------------------------------


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_lse=False,
):
    """Fused attention over ``(batch, seqlen, nheads, headdim)`` tensors; differentiable in q, k, v.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, float32 / bfloat16 / float16, headdim in [1, 256].
        k, v: ``(batch, seqlen_k, nheads_kv, headdim)``; ``nheads % nheads_kv == 0`` (GQA / MQA).
        dropout_p: attention dropout probability in [0, 1) (CPU only): each probability is dropped with
            probability ``dropout_p`` and kept ones are scaled by ``1 / (1 - dropout_p)``. The mask's seed is
            drawn from torch's default CPU generator (``torch.manual_seed`` reproduces it); the backward
            regenerates the same mask.
        softmax_scale: scale of ``q·k``; default ``headdim ** -0.5``.
        causal: bottom-right aligned causal mask (same as ``window_size[1] = 0``).
        window_size: ``(left, right)``; query ``i`` sees keys ``[i + seqlen_k - seqlen_q - left,
            i + seqlen_k - seqlen_q + right]``; -1 is unbounded.
        softcap: ``> 0`` caps scores as ``softcap * tanh(s / softcap)``.
        alibi_slopes: float32 ``(nheads,)`` or ``(batch, nheads)``: adds
            ``-slope * |i + seqlen_k - seqlen_q - j|``.
        deterministic: bit-reproducible backward (also across thread counts).
        return_attn_probs: return ``(out, softmax_lse, S_dmask)`` (FlashAttention's testing output): with
            ``dropout_p > 0``, S_dmask ``(batch, nheads, seqlen_q, seqlen_k)`` in q's dtype holds
            ``exp(score - row_max)``, negated where dropped, 0 where hidden; ``None`` when ``dropout_p == 0``.
        return_lse: keyword-only extra: return ``(out, softmax_lse)``.

    Returns:
        ``out`` like q; ``softmax_lse`` is float32 ``(batch, nheads, seqlen_q)``, not differentiable.

    Raises:
        TypeError / ValueError naming the argument; NotImplementedError for devices without a kernel.
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, return_lse)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_lse=False,
):
    """:func:`flash_attn_func` on ``qkv`` ``(batch, seqlen, 3, nheads, headdim)``; gradients go to ``qkv``."""
    q, k, v = _unpack("qkv", qkv, 3, 5)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, return_lse, names=("qkv", "qkv", "qkv"))


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_lse=False,
):
    """:func:`flash_attn_func` with ``kv`` ``(batch, seqlen_k, 2, nheads_kv, headdim)``; gradients go to
    ``kv``."""
    k, v = _unpack("kv", kv, 2, 5)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, return_lse, names=("q", "kv", "kv"))


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    *,
    return_lse=False,
):
    """Attention over packed documents; differentiable in q, k, v.

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_kv, headdim)``, or with ``block_table``
            paged ``(num_blocks, page_block_size, nheads_kv, headdim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` cumulative document lengths (from 0,
            non-decreasing, ending at the token counts; documents may be empty). Document ``b`` of q sees
            only document ``b`` of k; masks and windows align per document.
        max_seqlen_q, max_seqlen_k: upper bounds of the document lengths (checked).
        block_table: int32 ``(batch, max_num_blocks_per_seq)``: key ``p`` of document ``b`` is slot
            ``p % page_block_size`` of block ``block_table[b, p // page_block_size]`` (gathered once).
        others: as :func:`flash_attn_func`; ``softmax_lse`` is ``(nheads, total_q)``; S_dmask is ``(batch,
            nheads, max_seqlen_q, max_seqlen_k)`` with document ``b``'s block at the top left of row ``b``.
    """
    if block_table is not None:
        k, v = _paged_keys(k, v, block_table, cu_seqlens_k)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, return_lse)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_lse=False,
):
    """:func:`flash_attn_varlen_func` on ``qkv`` ``(total, 3, nheads, headdim)`` (one ``cu_seqlens`` for q and
    k); gradients go to ``qkv``."""
    q, k, v = _unpack("qkv", qkv, 3, 4)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, return_lse,
                   names=("qkv", "qkv", "qkv"))


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_lse=False,
):
    """:func:`flash_attn_varlen_func` with ``kv`` ``(total_k, 2, nheads_kv, headdim)``; gradients go to
    ``kv``."""
    k, v = _unpack("kv", kv, 2, 4)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, return_lse,
                   names=("q", "kv", "kv"))


def _capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Keys a cache row can hold: seqlen_cache, or pages per row * page size when paged."""
    return k_cache.shape[1] if block_table is None else k_cache.shape[1] * block_table.shape[1]


_KVCACHE_OPTIONAL = (
    "k",
    "v",
    "rotary_cos",
    "rotary_sin",
    "cache_batch_idx",
    "cache_leftpad",
    "block_table",
    "alibi_slopes",
)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention against a preallocated (optionally paged) KV cache, for generation; not differentiable.

    If ``k``/``v`` ``(batch, seqlen_new, nheads_kv, headdim)`` are given they are written **in place** into
    ``k_cache``/``v_cache`` at positions ``cache_seqlens[b] ...`` of each row (rotated first when
    ``rotary_cos``/``rotary_sin`` ``(seqlen_ro, rotary_dim / 2)`` are given; q is rotated too), then q
    ``(batch, seqlen_q, nheads, headdim)`` attends to the first ``cache_seqlens[b] + seqlen_new`` positions.
    ``cache_seqlens`` (an int, or int32 ``(batch,)``; ``None`` = the whole cache) is not modified. The cache
    is ``(batch_cache, seqlen_cache, nheads_kv, headdim)``, or ``(num_blocks, page_block_size, nheads_kv,
    headdim)`` with ``block_table`` int32 ``(batch, max_num_blocks_per_seq)``. ``cache_batch_idx`` picks the
    cache row of each q row; ``cache_leftpad`` hides the first keys of each row. ``causal`` defaults to False,
    as in FlashAttention; ``num_splits`` (0 = automatic) bounds the key splits of decode.

    Returns ``out``, or ``(out, softmax_lse)`` with ``return_softmax_lse`` (float32 ``(batch, nheads,
    seqlen_q)``, ``-inf`` for a query that sees no key).
    """
    # Decode calls this once per token per layer, so only what C++ cannot see is checked here (devices:
    # mixed devices would dispatch elsewhere; the cache_seqlens form); shapes, dtypes, contiguity, overflow
    # and the optional tensors' contents are checked by the C++ launcher, whose errors name the arguments.
    try:
        dev = q.device
        mixed = k_cache.device != dev or v_cache.device != dev
    except AttributeError:
        raise _not_a_tensor({"q": q, "k_cache": k_cache, "v_cache": v_cache}, {}) from None
    optional = (k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table, alibi_slopes)
    for name, t in zip(_KVCACHE_OPTIONAL, optional):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        mixed = mixed or t.device != dev
    if mixed:
        listed = ", ".join(
            f"{n} on {t.device}"
            for n, t in zip(("q", "k_cache", "v_cache") + _KVCACHE_OPTIONAL, (q, k_cache, v_cache) + optional)
            if t is not None
        )
        raise ValueError(f"tensors must be on one device, got {listed}")
    if dev.type not in _DEVICES:
        raise NotImplementedError(f"q is on {dev}; attention has kernels for {', '.join(_DEVICES)} only")
    # The shapes are read below (capacity, default scale), before the C++ launcher's own checks.
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            f"q, k_cache, v_cache must be 4-D, got {list(q.shape)}, {list(k_cache.shape)}, "
            f"{list(v_cache.shape)}"
        )
    if block_table is not None and block_table.dim() != 2:
        raise ValueError(
            f"block_table must be 2-D (batch, max_num_blocks_per_seq), got shape {list(block_table.shape)}"
        )
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.device != dev:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {dev}: use one device")
        seqlens, scalar = cache_seqlens, 0
    elif cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending k/v (None means the cache is full)")
        seqlens, scalar = None, _capacity(k_cache, block_table)
    elif type(cache_seqlens) is int:
        seqlens, scalar = None, cache_seqlens
    elif hasattr(type(cache_seqlens), "__index__") and not isinstance(cache_seqlens, bool):
        seqlens, scalar = None, operator.index(cache_seqlens)  # e.g. numpy.int64
    else:
        raise TypeError(
            f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}"
        )
    # As in FlashAttention, q and the new k/v may be strided (views of a fused qkv projection) and the block
    # table a column slice of a larger one; the launcher wants them dense. The caches are written in place,
    # so they must be contiguous already.
    if not q.is_contiguous():
        q = q.contiguous()
    if k is not None and not k.is_contiguous():
        k = k.contiguous()
    if v is not None and not v.is_contiguous():
        v = v.contiguous()
    if block_table is not None and not block_table.is_contiguous():
        block_table = block_table.contiguous()
    causal = bool(causal)
    left, right = _window(window_size, causal, _capacity(k_cache, block_table))  # FA compares with capacity
    # Positional in the schema's order (window_left, window_right, softcap, alibi_slopes, rotary_cos,
    # rotary_sin, rotary_interleaved, cache_batch_idx, cache_leftpad, block_table, num_splits): keywords cost
    # several microseconds more per call in the dispatcher, and decode calls this per token per layer.
    out, lse = _kvcache_op(
        q, k_cache, v_cache, k, v, seqlens, scalar, _scale(softmax_scale, q), causal,
        left, right, _softcap(softcap), alibi_slopes, rotary_cos, rotary_sin, bool(rotary_interleaved),
        cache_batch_idx, cache_leftpad, block_table, _window_side("num_splits", num_splits),
    )  # fmt: skip
    return (out, lse) if return_softmax_lse else out
