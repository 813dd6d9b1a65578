"""Fuzz cases for every cm3leon_kernels op, through the Python API and raw ``torch.ops.cm3leon.*``.

A case is ``(op, entry, mutation, arg, seed)``: valid arguments are drawn from ``seed``, then one is spoiled
(``mutation`` applied to argument number ``arg``): moved to the meta device, given another dtype, another
shape or batch (together with its same-shaped siblings, e.g. k and v), made non-contiguous, given a NaN/inf
(or, for integer tensors, an out-of-range value), or a scalar replaced by a bad value. Every outcome must be
one of:

- an ordinary Python exception (the op refused the input), never for an unspoiled case; for the attention
  ops through the raw entry its message names a spoiled argument (or a same-shaped sibling changed with it);
- a result that passes the checks: outputs on the inputs' device, integer outputs in range, and, where the
  inputs are finite and the plain-PyTorch reference accepts them, agreement with the reference.

Outputs are allocated poisoned (NaN floats, huge integers), so uninitialised elements cannot pass. The
runner (:func:`main`) is executed in a subprocess by ``test_fuzz_ops.py``, so a crash or hang is a finding
rather than the end of the test run; it prints one line per case: ``ok``, ``refused`` or ``BAD ...``.
"""
from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from helpers import poisoned_outputs
from kvcache_reference import logical_rows
from kvcache_reference import reference as kvcache_reference

import cm3leon_kernels as ck
from cm3leon_kernels import reference

ops = torch.ops.cm3leon
MUTATIONS = ("none", "meta", "dtype", "shape", "batch", "noncontig", "nonfinite", "scalar")
BAD_SCALARS = (float("nan"), float("inf"), -float("inf"), -1, 0, 10 ** 30, 2 ** 70, 1.5, "x", None, True)
Args = dict[str, object]


@dataclass(frozen=True)
class OpSpec:
    build: Callable[[random.Random, torch.Generator], Args]   # valid arguments
    entries: dict[str, Callable[[Args], tuple]]               # entry name -> call returning the outputs
    reference: Callable[[Args], tuple]                        # float64 expected outputs (same order)
    tensors: tuple[str, ...]                                  # the tensor arguments (mutation targets)
    scalars: tuple[str, ...]                                  # the scalar arguments (mutation targets)
    int_bounds: Callable[[Args], dict[int, int]] = lambda a: {}  # output index -> exclusive upper bound
    compare: str = "close"                                    # "close", "sampled", "nearest", "quantize"
    ignores: tuple[str, ...] = ()                             # arguments the Python entry does not read
    names_arguments: bool = False                             # a raw refusal must name a spoiled argument
    derived: tuple[str, ...] = ()                             # inputs the builder computed from the others


def _f64(*ts):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]


# ---- attention --------------------------------------------------------------------------------------------

def _attn_shapes(rng: random.Random) -> tuple[int, int, int, int, int, int]:
    hkv = rng.choice((1, 2))
    return rng.randint(1, 3), rng.randint(1, 40), rng.randint(1, 40), hkv * rng.choice((1, 2)), hkv, \
        rng.choice((8, 16, 32))


# The trailing arguments of the forward/backward ops (local window, softcap, ALiBi, deterministic); the
# "[extras]" specs draw them, the others leave them at their defaults. The KV-cache op takes the first four.
_EXTRAS = ("window_left", "window_right", "softcap", "alibi_slopes", "deterministic")
_EXTRA_SCALARS = ("window_left", "window_right", "softcap", "deterministic")


def _draw_extras(rng, gen, batch: int, heads: int) -> Args:
    slopes = rng.choice((None, (heads,), (batch, heads)))
    return {"window_left": rng.choice((-1, 0, rng.randint(1, 12))),
            "window_right": rng.choice((-1, 0, rng.randint(1, 12))),
            "softcap": rng.choice((0.0, rng.uniform(0.5, 5.0))),
            "alibi_slopes": None if slopes is None else torch.rand(slopes, generator=gen)}


def _draw_op_extras(rng, gen, batch: int, heads: int) -> Args:
    """The forward/backward ops' extras: the KV-cache op's plus the backward's reduction mode."""
    return _draw_extras(rng, gen, batch, heads) | {"deterministic": rng.random() < 0.5}


def _extras(a: Args) -> tuple:
    return tuple(a[n] for n in _EXTRAS if n in a)


def _ref_extras(a: Args) -> dict:
    """reference.attention's keywords for the drawn extras (defaults when the spec draws none)."""
    return {"window_size": (a.get("window_left", -1), a.get("window_right", -1)),
            "softcap": a.get("softcap", 0.0), "alibi_slopes": a.get("alibi_slopes")}


def _dense_build(rng, gen, extras: bool = False) -> Args:
    b, sq, sk, hq, hkv, d = _attn_shapes(rng)
    a = {"q": torch.randn(b, sq, hq, d, generator=gen), "k": torch.randn(b, sk, hkv, d, generator=gen),
         "v": torch.randn(b, sk, hkv, d, generator=gen), "softmax_scale": rng.uniform(0.05, 0.5),
         "causal": rng.random() < 0.5}
    return a | _draw_op_extras(rng, gen, b, hq) if extras else a


def _dense_backward_build(rng, gen, extras: bool = False) -> Args:
    a = _dense_build(rng, gen, extras)
    out, lse = ops.flash_attn_forward(a["q"], a["k"], a["v"], a["softmax_scale"], a["causal"], *_extras(a))
    return a | {"dout": torch.randn(out.shape, generator=gen), "out": out, "lse": lse}


def _grads(fn, a: Args, inputs=("q", "k", "v")) -> tuple:
    leaves = [a[n].detach().clone().requires_grad_() for n in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, a["dout"])


def _dense_ref(a):
    q, k, v = _f64(a["q"], a["k"], a["v"])
    return reference.attention(q, k, v, a["softmax_scale"], a["causal"], **_ref_extras(a))


def _dense_backward_ref(a):
    ref = a | {"dout": a["dout"].double()}
    return _grads(lambda q, k, v: reference.attention(q, k, v, a["softmax_scale"], a["causal"],
                                                      **_ref_extras(a))[0],
                  ref | dict(zip("qkv", _f64(a["q"], a["k"], a["v"]))))


def _varlen_build(rng, gen, extras: bool = False) -> Args:
    _, _, _, hq, hkv, d = _attn_shapes(rng)
    docs = rng.randint(1, 3)
    lq = [rng.randint(0, 20) for _ in range(docs)]
    lk = [rng.randint(0, 20) for _ in range(docs)]
    cum = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    a = {"q": torch.randn(sum(lq), hq, d, generator=gen), "k": torch.randn(sum(lk), hkv, d, generator=gen),
         "v": torch.randn(sum(lk), hkv, d, generator=gen),
         "cu_seqlens_q": cum(lq), "cu_seqlens_k": cum(lk),
         "max_seqlen_q": max(lq), "max_seqlen_k": max(lk), "softmax_scale": rng.uniform(0.05, 0.5),
         "causal": rng.random() < 0.5}
    return a | _draw_op_extras(rng, gen, docs, hq) if extras else a


_VARLEN_SIDE = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal")


def _varlen_backward_build(rng, gen, extras: bool = False) -> Args:
    a = _varlen_build(rng, gen, extras)
    out, lse = ops.flash_attn_varlen_forward(a["q"], a["k"], a["v"], *(a[n] for n in _VARLEN_SIDE), *_extras(a))
    return a | {"dout": torch.randn(out.shape, generator=gen), "out": out, "lse": lse}


def _varlen_ref_fn(a):
    return lambda q, k, v: reference.attention_varlen(q, k, v, a["cu_seqlens_q"], a["cu_seqlens_k"],
                                                      a["softmax_scale"], a["causal"], **_ref_extras(a))


def _varlen_python(a, q, k, v):
    return ck.flash_attn_varlen_func(q, k, v, a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                                     a["max_seqlen_k"], softmax_scale=a["softmax_scale"], causal=a["causal"])


def _kvcache_build(rng, gen) -> Args:
    b, sq, _, hq, hkv, d = _attn_shapes(rng)
    cache_len, new = rng.randint(1, 40), rng.randint(0, 3)
    new = min(new, cache_len)
    seqlens = torch.tensor([rng.randint(0, cache_len - new) for _ in range(b)], dtype=torch.int32)
    k_new = torch.randn(b, new, hkv, d, generator=gen) if new else None
    return {"q": torch.randn(b, rng.randint(1, 4), hq, d, generator=gen),
            "k_cache": torch.randn(b, cache_len, hkv, d, generator=gen),
            "v_cache": torch.randn(b, cache_len, hkv, d, generator=gen),
            "k": k_new, "v": None if k_new is None else torch.randn(k_new.shape, generator=gen),
            "cache_seqlens": seqlens, "softmax_scale": rng.uniform(0.05, 0.5), "causal": rng.random() < 0.5}


def _kvcache_ref(a):
    k_cache, v_cache, q, k, v = _f64(a["k_cache"].clone(), a["v_cache"].clone(), a["q"], a["k"], a["v"])
    out, lse = reference.attention_with_kvcache(q, k_cache, v_cache, k, v, a["cache_seqlens"],
                                                a["softmax_scale"], a["causal"])
    return out, lse, k_cache, v_cache


def _kvcache_python(a):
    out, lse = ck.flash_attn_with_kvcache(a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"],
                                          cache_seqlens=a["cache_seqlens"], softmax_scale=a["softmax_scale"],
                                          causal=a["causal"], return_softmax_lse=True)
    return out, lse, a["k_cache"], a["v_cache"]


def _kvcache_raw(a):
    out, lse = ops.flash_attn_kvcache(a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"],
                                      a["cache_seqlens"], 0, a["softmax_scale"], a["causal"])
    return out, lse, a["k_cache"], a["v_cache"]


# The KV-cache op's trailing arguments after the extras, in schema order.
_KV_FEATURES = ("rotary_cos", "rotary_sin", "rotary_interleaved", "cache_batch_idx", "cache_leftpad",
                "block_table", "num_splits")


def _kvcache_extras_build(rng, gen) -> Args:
    """_kvcache_build plus the extras, left padding, rotary tables, and a cache addressed through
    cache_batch_idx (spare rows) or a block table (shuffled pages)."""
    a = _kvcache_build(rng, gen)
    b, sq, hq, d = a["q"].shape
    capacity, hkv = a["k_cache"].shape[1], a["k_cache"].shape[2]
    new = 0 if a["k"] is None else a["k"].shape[1]
    a |= _draw_extras(rng, gen, b, hq) | dict.fromkeys(_KV_FEATURES) | {"rotary_interleaved": rng.random() < 0.5,
                                                                        "num_splits": rng.choice((0, 1, 3))}
    layout = rng.choice(("rows", "cache_batch_idx", "block_table"))
    if layout == "cache_batch_idx":
        rows = b + rng.randint(1, 3)
        a["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:b].to(torch.int32)
        shape = (rows, capacity, hkv, d)
    elif layout == "block_table":
        page = rng.choice((1, 4, 16))
        per_row = -(-capacity // page)
        blocks = b * per_row + rng.randint(0, 2)
        a["block_table"] = torch.randperm(blocks, generator=gen)[:b * per_row].view(b, per_row).to(torch.int32)
        shape = (blocks, page, hkv, d)
        capacity = per_row * page
    if layout != "rows":
        a["k_cache"], a["v_cache"] = (torch.randn(shape, generator=gen) for _ in range(2))
    if rng.random() < 0.5:
        a["cache_leftpad"] = torch.tensor([rng.randint(0, int(s)) for s in a["cache_seqlens"]], dtype=torch.int32)
    if new and rng.random() < 0.5:  # the tables cover every position a row can reach
        angle = torch.rand(capacity + sq, rng.randint(1, d // 2), generator=gen) * 6.2832
        a["rotary_cos"], a["rotary_sin"] = angle.cos(), angle.sin()
    return a


def _kvcache_extras_raw(a):
    out, lse = ops.flash_attn_kvcache(a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"], a["cache_seqlens"], 0,
                                      a["softmax_scale"], a["causal"], *_extras(a),
                                      *(a[n] for n in _KV_FEATURES))
    case = {"block_table": a["block_table"], "cache_batch_idx": a["cache_batch_idx"]}
    return out, lse, logical_rows(a["k_cache"], case), logical_rows(a["v_cache"], case)


def _kvcache_extras_ref(a):
    """(out, lse, k rows, v rows) in float64, the cache rows in logical order (the layouts differ)."""
    k, v = (None, None) if a["k"] is None else _f64(a["k"], a["v"])
    case = {"q": a["q"].double(), "k": k, "v": v, "k_cache": a["k_cache"].double(),
            "v_cache": a["v_cache"].double(), "seqlens": a["cache_seqlens"], "leftpad": a["cache_leftpad"],
            "cache_batch_idx": a["cache_batch_idx"], "block_table": a["block_table"],
            "scale": a["softmax_scale"], "causal": a["causal"], "window": (a["window_left"], a["window_right"]),
            "softcap": a["softcap"], "alibi": a["alibi_slopes"], "cos": a["rotary_cos"], "sin": a["rotary_sin"],
            "interleaved": a["rotary_interleaved"]}
    return kvcache_reference(case, torch.float64)


# ---- VQ ---------------------------------------------------------------------------------------------------

def _vq_build(rng, gen) -> Args:
    d, k = rng.randint(1, 20), rng.randint(1, 40)
    return {"z": torch.randn(rng.randint(0, 50), d, generator=gen),
            "codebook": torch.randn(k, d, generator=gen),
            "indices": torch.randint(0, k, (rng.randint(0, 50),), generator=gen),
            "metric": rng.choice(("l2", "cosine")), "beta": rng.uniform(0, 1)}


def _vq_nearest_ref(a):
    z, codebook = _f64(a["z"], a["codebook"])
    return reference.vq_nearest(z, codebook, metric=a["metric"])


# ---- sampling ---------------------------------------------------------------------------------------------

def _mask_and_range(rng, gen, batch: int, vocab: int) -> Args:
    lo = rng.randint(0, vocab - 1)
    hi = rng.randint(lo + 1, vocab)
    mask = None
    if rng.random() < 0.4:
        mask = torch.rand((batch, vocab) if rng.random() < 0.5 else (vocab,), generator=gen) < 0.7
        mask[..., lo] = True  # every row keeps an allowed token
    seed, step = rng.randint(0, 2 ** 63 - 1), rng.randint(0, 1000)
    if rng.random() < 0.3:  # the tensor forms: per-row seeds, a one-element step
        seed, step = torch.randint(0, 2 ** 62, (batch,), generator=gen), torch.tensor(step)
    return {"allowed_range": (lo, hi) if rng.random() < 0.6 else None, "allowed_mask": mask, "seed": seed,
            "step": step}


def _cfg_build(rng, gen) -> Args:
    batch, streams, vocab = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 300)
    a = {"logits": torch.randn(batch, streams, vocab, generator=gen) * 3,
         "guidance_scale": [None, rng.uniform(0, 4), (rng.uniform(0, 3), rng.uniform(0, 3))][streams - 1],
         "temperature": rng.choice((0.0, 0.5, 1.0, 2.0)), "top_k": rng.randint(0, vocab),
         "top_p": rng.uniform(0.05, 1.0), "min_p": rng.choice((0.0, 0.1, 0.5))}
    a = a | _mask_and_range(rng, gen, batch, vocab)
    if a["allowed_range"] is None and a["allowed_mask"] is not None:
        a["allowed_range"] = (0, vocab)
    return a


def _vocab_raw(a, vocab: int) -> tuple:
    r = a["allowed_range"]
    lo, hi = (0, vocab) if r is None else (r if isinstance(r, tuple) else (r, r))  # bad values pass through
    return lo, hi, a["allowed_mask"]


def _seed_step_raw(a) -> tuple:
    """(seed, seeds, step, step_tensor) of the raw schema; bad scalar values pass through to the op."""
    seed, step = a["seed"], a["step"]
    tensor = lambda x: isinstance(x, torch.Tensor)  # noqa: E731
    return (0 if tensor(seed) else seed, seed if tensor(seed) else None,
            0 if tensor(step) else step, step if tensor(step) else None)


def _cfg_raw(a):
    logits = a["logits"]
    scales = [] if a["guidance_scale"] is None else (
        [a["guidance_scale"]] if not isinstance(a["guidance_scale"], tuple) else list(a["guidance_scale"]))
    return ops.cfg_sample(logits, scales, a["temperature"], a["top_k"], a["top_p"], a["min_p"],
                          *_vocab_raw(a, logits.shape[-1]), *_seed_step_raw(a))


def _cfg_python(a):
    return ck.cfg_sample(a["logits"], guidance_scale=a["guidance_scale"], temperature=a["temperature"],
                         top_k=a["top_k"], top_p=a["top_p"], min_p=a["min_p"],
                         allowed_range=a["allowed_range"], allowed_mask=a["allowed_mask"], seed=a["seed"],
                         step=a["step"], return_logprobs=True)


def _cfg_ref(a):
    return (reference.cfg_probs(a["logits"].double(), guidance_scale=a["guidance_scale"],
                                temperature=a["temperature"], top_k=a["top_k"], top_p=a["top_p"],
                                min_p=a["min_p"],
                                allowed_range=a["allowed_range"], allowed_mask=a["allowed_mask"]),)


def _contrastive_build(rng, gen) -> Args:
    batch, vocab = rng.randint(1, 3), rng.randint(1, 300)
    a = {"expert_logits": torch.randn(batch, vocab, generator=gen) * 3,
         "amateur_logits": torch.randn(batch, vocab, generator=gen) * 3, "alpha": rng.uniform(0, 1),
         "k": rng.randint(1, vocab), "temperature": rng.choice((0.0, 0.5, 1.0)),
         "amateur_temperature": rng.uniform(0.2, 2.0)}
    return a | _mask_and_range(rng, gen, batch, vocab)


def _contrastive_raw(a):
    return ops.contrastive_sample(a["expert_logits"], a["amateur_logits"], a["alpha"], a["k"],
                                  a["temperature"], a["amateur_temperature"],
                                  *_vocab_raw(a, a["expert_logits"].shape[-1]), *_seed_step_raw(a))


def _contrastive_python(a):
    return ck.contrastive_sample(a["expert_logits"], a["amateur_logits"], alpha=a["alpha"], k=a["k"],
                                 temperature=a["temperature"], amateur_temperature=a["amateur_temperature"],
                                 allowed_range=a["allowed_range"], allowed_mask=a["allowed_mask"],
                                 seed=a["seed"], step=a["step"], return_logprobs=True)


def _contrastive_ref(a):
    return (reference.contrastive_probs(a["expert_logits"].double(), a["amateur_logits"].double(),
                                        alpha=a["alpha"], k=a["k"], temperature=a["temperature"],
                                        amateur_temperature=a["amateur_temperature"],
                                        allowed_range=a["allowed_range"], allowed_mask=a["allowed_mask"]),)


# ---- fused linear + cross-entropy -------------------------------------------------------------------------

_LCE_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_LCE_SCALARS = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap")


def _lce_build(rng, gen) -> Args:
    tokens, dim, vocab = rng.randint(0, 30), rng.randint(1, 20), rng.randint(1, 120)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[torch.rand(tokens, generator=gen) < 0.2] = -100
    a = {"hidden": torch.randn(tokens, dim, generator=gen), "weight": torch.randn(vocab, dim, generator=gen) * 0.5,
         "targets": targets, "loss_weights": torch.rand(tokens, generator=gen) if rng.random() < 0.5 else None,
         "ignore_index": -100, "reduction": rng.choice(tuple(_LCE_REDUCTIONS)),
         "label_smoothing": rng.choice((0.0, 0.1)), "z_loss": rng.choice((0.0, 1e-3)),
         "softcap": rng.choice((None, 4.0))}
    return a | {"grad": torch.randn(tokens, generator=gen)}


def _lce_kwargs(a: Args) -> dict:
    return {n: a[n] for n in ("loss_weights",) + _LCE_SCALARS}


def _lce_raw_scalars(a: Args) -> tuple:
    """ignore_index, label_smoothing, z_loss, softcap of the raw schema; bad values pass through."""
    return a["ignore_index"], a["label_smoothing"], a["z_loss"], 0.0 if a["softcap"] is None else a["softcap"]


def _lce_raw(a):
    ignore, smoothing, z, cap = _lce_raw_scalars(a)
    out = ops.linear_cross_entropy_forward(a["hidden"], a["weight"], a["targets"], a["loss_weights"], ignore,
                                           smoothing, z, cap, _LCE_REDUCTIONS.get(a["reduction"], a["reduction"]),
                                           False)
    return out[:2]


def _lce_ref(a):
    hidden, weight, lw = _f64(a["hidden"], a["weight"], a["loss_weights"])
    return reference.linear_cross_entropy(hidden, weight, a["targets"], return_lse=True,
                                          **(_lce_kwargs(a) | {"loss_weights": lw}))


def _lce_backward_raw(a):
    ignore, smoothing, z, cap = _lce_raw_scalars(a)
    lse = ops.linear_cross_entropy_forward(a["hidden"], a["weight"], a["targets"], a["loss_weights"], ignore,
                                           smoothing, z, cap, 0, False)[1]
    return ops.linear_cross_entropy_backward(a["grad"], a["hidden"], a["weight"], a["targets"], a["loss_weights"],
                                             lse, ignore, smoothing, z, cap)


def _lce_grads(fn, a: Args, hidden, weight, lw) -> tuple:
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    loss = fn(*leaves, a["targets"], **(_lce_kwargs(a) | {"loss_weights": lw, "reduction": "none"}))
    return torch.autograd.grad(loss, leaves, a["grad"].to(loss.dtype))


_ATTN = ("softmax_scale", "causal")
_DERIVED = ("out", "lse")  # the backward's inputs made by the forward
_BACKWARD = {"names_arguments": True, "derived": _DERIVED}
SPECS: dict[str, OpSpec] = {
    "flash_attn_forward": OpSpec(
        _dense_build,
        {"python": lambda a: ck.flash_attn_func(a["q"], a["k"], a["v"], softmax_scale=a["softmax_scale"],
                                                causal=a["causal"], return_lse=True),
         "raw": lambda a: ops.flash_attn_forward(a["q"], a["k"], a["v"], a["softmax_scale"], a["causal"])},
        _dense_ref, ("q", "k", "v"), _ATTN, names_arguments=True),
    "flash_attn_backward": OpSpec(
        _dense_backward_build,
        {"python": lambda a: _grads(lambda q, k, v: ck.flash_attn_func(
            q, k, v, softmax_scale=a["softmax_scale"], causal=a["causal"]), a),
         "raw": lambda a: ops.flash_attn_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"],
                                                  a["softmax_scale"], a["causal"])},
        _dense_backward_ref, ("dout", "q", "k", "v", "out", "lse"), _ATTN, ignores=_DERIVED, **_BACKWARD),
    "flash_attn_varlen_forward": OpSpec(
        _varlen_build,
        {"python": lambda a: ck.flash_attn_varlen_func(
            a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
            a["max_seqlen_k"], softmax_scale=a["softmax_scale"], causal=a["causal"], return_lse=True),
         "raw": lambda a: ops.flash_attn_varlen_forward(a["q"], a["k"], a["v"],
                                                        *(a[n] for n in _VARLEN_SIDE))},
        lambda a: _varlen_ref_fn(a)(*_f64(a["q"], a["k"], a["v"])),
        ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"), ("max_seqlen_q", "max_seqlen_k") + _ATTN,
        names_arguments=True),
    "flash_attn_varlen_backward": OpSpec(
        _varlen_backward_build,
        {"python": lambda a: _grads(lambda q, k, v: _varlen_python(a, q, k, v), a),
         "raw": lambda a: ops.flash_attn_varlen_backward(a["dout"], a["q"], a["k"], a["v"], a["out"],
                                                         a["lse"], *(a[n] for n in _VARLEN_SIDE))},
        lambda a: _grads(lambda q, k, v: _varlen_ref_fn(a)(q, k, v)[0],
                         a | {"dout": a["dout"].double()} | dict(zip("qkv", _f64(a["q"], a["k"], a["v"])))),
        ("dout", "q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_k"),
        ("max_seqlen_q", "max_seqlen_k") + _ATTN, ignores=_DERIVED, **_BACKWARD),
    "flash_attn_forward[extras]": OpSpec(
        lambda rng, gen: _dense_build(rng, gen, extras=True),
        {"raw": lambda a: ops.flash_attn_forward(a["q"], a["k"], a["v"], a["softmax_scale"], a["causal"],
                                                 *_extras(a))},
        _dense_ref, ("q", "k", "v", "alibi_slopes"), _ATTN + _EXTRA_SCALARS, names_arguments=True),
    "flash_attn_backward[extras]": OpSpec(
        lambda rng, gen: _dense_backward_build(rng, gen, extras=True),
        {"raw": lambda a: ops.flash_attn_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"],
                                                  a["softmax_scale"], a["causal"], *_extras(a))},
        _dense_backward_ref, ("dout", "q", "k", "v", "out", "lse", "alibi_slopes"), _ATTN + _EXTRA_SCALARS,
        **_BACKWARD),
    "flash_attn_varlen_forward[extras]": OpSpec(
        lambda rng, gen: _varlen_build(rng, gen, extras=True),
        {"raw": lambda a: ops.flash_attn_varlen_forward(a["q"], a["k"], a["v"], *(a[n] for n in _VARLEN_SIDE),
                                                        *_extras(a))},
        lambda a: _varlen_ref_fn(a)(*_f64(a["q"], a["k"], a["v"])),
        ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"),
        ("max_seqlen_q", "max_seqlen_k") + _ATTN + _EXTRA_SCALARS, names_arguments=True),
    "flash_attn_varlen_backward[extras]": OpSpec(
        lambda rng, gen: _varlen_backward_build(rng, gen, extras=True),
        {"raw": lambda a: ops.flash_attn_varlen_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"],
                                                         *(a[n] for n in _VARLEN_SIDE), *_extras(a))},
        lambda a: _grads(lambda q, k, v: _varlen_ref_fn(a)(q, k, v)[0],
                         a | {"dout": a["dout"].double()} | dict(zip("qkv", _f64(a["q"], a["k"], a["v"])))),
        ("dout", "q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"),
        ("max_seqlen_q", "max_seqlen_k") + _ATTN + _EXTRA_SCALARS, **_BACKWARD),
    "flash_attn_kvcache": OpSpec(
        _kvcache_build, {"python": _kvcache_python, "raw": _kvcache_raw}, _kvcache_ref,
        ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens"), _ATTN, names_arguments=True),
    "flash_attn_kvcache[extras]": OpSpec(
        _kvcache_extras_build, {"raw": _kvcache_extras_raw}, _kvcache_extras_ref,
        ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "alibi_slopes", "rotary_cos", "rotary_sin",
         "cache_batch_idx", "cache_leftpad", "block_table"),
        _ATTN + _EXTRA_SCALARS[:3] + ("rotary_interleaved", "num_splits"), names_arguments=True),
    "vq_nearest": OpSpec(
        _vq_build,
        {"python": lambda a: ck.vq_nearest(a["z"], a["codebook"], metric=a["metric"]),
         "raw": lambda a: ops.vq_nearest(a["z"], a["codebook"], a["metric"])},
        _vq_nearest_ref, ("z", "codebook"), ("metric",),
        int_bounds=lambda a: {0: a["codebook"].shape[0]}, compare="nearest"),
    "vq_embed": OpSpec(
        _vq_build,
        {"python": lambda a: (ck.vq_embed(a["indices"], a["codebook"]),),
         "raw": lambda a: (ops.vq_embed(a["indices"], a["codebook"]),)},
        lambda a: (reference.vq_embed(a["indices"], a["codebook"].double()),), ("indices", "codebook"), ()),
    "vector_quantize": OpSpec(
        _vq_build,
        {"python": lambda a: tuple(ck.vector_quantize(a["z"], a["codebook"], a["beta"],
                                                      metric=a["metric"]))[:2]},
        lambda a: (None, _vq_nearest_ref(a)[0]), ("z", "codebook"), ("beta", "metric"),
        int_bounds=lambda a: {1: a["codebook"].shape[0]}, compare="quantize"),
    "cfg_sample": OpSpec(
        _cfg_build, {"python": _cfg_python, "raw": _cfg_raw}, _cfg_ref,
        ("logits", "allowed_mask", "seed", "step"),
        ("guidance_scale", "temperature", "top_k", "top_p", "min_p", "allowed_range", "seed", "step"),
        int_bounds=lambda a: {0: a["logits"].shape[-1]}, compare="sampled"),
    "contrastive_sample": OpSpec(
        _contrastive_build, {"python": _contrastive_python, "raw": _contrastive_raw}, _contrastive_ref,
        ("expert_logits", "amateur_logits", "allowed_mask", "seed", "step"),
        ("alpha", "k", "temperature", "amateur_temperature", "allowed_range", "seed", "step"),
        int_bounds=lambda a: {0: a["expert_logits"].shape[-1]}, compare="sampled"),
    "linear_cross_entropy": OpSpec(
        _lce_build,
        {"python": lambda a: ck.linear_cross_entropy(a["hidden"], a["weight"], a["targets"], return_lse=True,
                                                     **_lce_kwargs(a)),
         "raw": _lce_raw},
        _lce_ref, ("hidden", "weight", "targets", "loss_weights"), _LCE_SCALARS, ignores=("grad",)),
    "linear_cross_entropy_backward": OpSpec(
        _lce_build,
        {"python": lambda a: _lce_grads(ck.linear_cross_entropy, a, a["hidden"], a["weight"], a["loss_weights"]),
         "raw": _lce_backward_raw},
        lambda a: _lce_grads(reference.linear_cross_entropy, a, *_f64(a["hidden"], a["weight"], a["loss_weights"])),
        ("grad", "hidden", "weight", "targets", "loss_weights"), _LCE_SCALARS[:1] + _LCE_SCALARS[2:]),
}


# ---- mutations --------------------------------------------------------------------------------------------

def _mutate(a: Args, spec: OpSpec, mutation: str, arg: int, rng: random.Random) -> tuple[Args, list[str]]:
    """The spoiled arguments and the names of those changed."""
    a = dict(a)
    if mutation == "none":
        return a, []
    if mutation == "scalar":
        if not spec.scalars:
            return a, []
        name = spec.scalars[arg % len(spec.scalars)]
        a[name] = rng.choice(BAD_SCALARS)
        return a, [name]
    present = [n for n in spec.tensors if isinstance(a.get(n), torch.Tensor)]
    if not present:
        return a, []
    name = present[arg % len(present)]
    changed = [name]
    t: torch.Tensor = a[name]
    if mutation == "meta":
        a[name] = t.to("meta")
    elif mutation == "dtype":
        a[name] = t.to(rng.choice([d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                               torch.int64, torch.int32, torch.bool) if d != t.dtype]))
    elif mutation in ("shape", "batch"):
        shape = list(t.shape)
        if mutation == "batch" and shape:
            shape[0] = rng.choice((0, shape[0] + 1, max(shape[0] - 1, 0), 2 * shape[0] + 1))
        elif rng.random() < 0.3 or not shape:
            shape = shape + [1] if rng.random() < 0.5 or not shape else shape[:-1]
        else:
            axis = rng.randrange(len(shape))
            shape[axis] = max(shape[axis] + rng.choice((-1, 1, 8)), 0)
        # Same-shaped siblings (k and v, q/dout/out) change together, so the mismatch is with the rest.
        for other in present:
            s = a[other]
            if s.shape == t.shape and s.dtype == t.dtype:
                a[other] = torch.randn(shape).to(t.dtype) if t.is_floating_point() else \
                    torch.zeros(shape, dtype=t.dtype)
                changed += [other] if other != name else []
    elif mutation == "noncontig":
        if t.dim() >= 2 and rng.random() < 0.5:
            a[name] = t.transpose(0, 1).contiguous().transpose(0, 1)  # last dim still dense
        else:
            wide = torch.zeros(*t.shape, 2, dtype=t.dtype)
            wide[..., 0] = t
            a[name] = wide[..., 0]  # every dim strided
    elif mutation == "nonfinite" and t.numel():
        t = t.clone()
        flat = t.view(-1)
        where = rng.randrange(flat.numel())
        if t.is_floating_point():
            flat[where] = rng.choice((float("nan"), float("inf"), -float("inf")))
        elif t.dtype != torch.bool:
            flat[where] = rng.choice((-1, 2 ** 31 - 1 if t.dtype == torch.int32 else 2 ** 62))
        a[name] = t
    return a, changed


# ---- one case -------------------------------------------------------------------------------------------

def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    g, w = got.double(), want.double()
    same_inf = (g == w) & torch.isinf(w)
    err = torch.where(same_inf, torch.zeros_like(g), (g - w).abs() / (1 + w.abs()))
    if err.isnan().any() or (err > tol).any():
        return f"{name}: max relative error {err.nan_to_num(float('inf')).max().item():.3g} > {tol}"
    return None


def run_case(op: str, entry: str, mutation: str, arg: int, seed: int) -> str:
    """Runs one case; returns "ok", "refused" or "BAD <reason>"."""
    spec = SPECS[op]
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    args, spoiled = _mutate(spec.build(rng, gen), spec, mutation, arg, rng)
    before = {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in args.items()}
    try:
        with poisoned_outputs():
            outputs = spec.entries[entry](args)
    except (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError) as err:
        message = str(err).splitlines()[0][:200] if str(err) else ""
        if mutation == "none":
            return f"BAD an unspoiled call raised {type(err).__name__}: {message}"
        named = any(re.search(rf"\b{n}\b", str(err)) for n in spoiled)
        if spec.names_arguments and entry == "raw" and spoiled and not named:
            return f"BAD refused {'/'.join(spoiled)} without naming it: {type(err).__name__}: {message}"
        return "refused"
    read = [v for n, v in before.items() if not (entry == "python" and n in spec.ignores)]
    inputs, outputs = _tensors(read), _tensors(outputs)
    devices = {t.device.type for t in inputs}
    if "meta" in devices:  # all-meta calls propagate shapes; mixing meta with real tensors must raise
        if len(devices) > 1:
            return "BAD accepted a meta tensor mixed with CPU tensors"
        return "ok" if all(t.device.type == "meta" for t in outputs) else "BAD meta inputs, real outputs"
    if any(t.device.type != "cpu" for t in outputs):
        return f"BAD outputs on {[str(t.device) for t in outputs]}"
    for index, bound in spec.int_bounds(before).items():
        out = outputs[index]
        if out.numel() and not (0 <= int(out.min()) and int(out.max()) < bound):
            return f"BAD output {index} outside [0, {bound}): {out.tolist()[:8]}"
    if mutation in ("nonfinite", "scalar", "meta"):
        return "ok"  # no meaningful reference (e.g. an accepted huge scale overflows float32 scores)
    if entry == "raw" and spec.derived and any(n not in spec.derived for n in spoiled):
        return "ok"  # e.g. the raw backward got out/lse of the unspoiled inputs: no reference for this call
    try:
        expected = spec.reference(before)
    except Exception:  # the reference cannot evaluate these inputs: the kernel's answer is unchecked
        return "ok"
    low_precision = any(t.dtype in (torch.bfloat16, torch.float16) for t in inputs)
    problem = _compare(spec, before, outputs, _tensors(expected) if spec.compare != "quantize" else expected,
                       3e-2 if low_precision else 2e-4)
    return f"BAD {problem}" if problem else "ok"


def _compare(spec: OpSpec, a: Args, outputs: list[torch.Tensor], expected, tol: float) -> str | None:
    if spec.compare == "sampled":
        probs = expected[0]
        tokens = outputs[0]
        chosen = probs.gather(1, tokens[:, None])[:, 0]
        return None if bool((chosen > 0).all()) else f"drew tokens {tokens.tolist()} of zero probability"
    if spec.compare in ("nearest", "quantize"):
        indices = outputs[0] if spec.compare == "nearest" else outputs[1]
        ref_indices = expected[0] if spec.compare == "nearest" else expected[1]
        if indices.shape != ref_indices.shape:
            return f"indices shape {tuple(indices.shape)} != {tuple(ref_indices.shape)}"
        dist = reference.vq_distances(*_f64(a["z"].reshape(-1, a["z"].shape[-1]), a["codebook"]), a["metric"])
        if dist.numel():
            best = dist.min(dim=1).values
            mine = dist.gather(1, indices.reshape(-1, 1))[:, 0]
            if ((mine - best) > tol * (1 + best.abs())).any():
                return "picked a code farther than the nearest one"
        if spec.compare == "quantize":  # z + (code - z): the code up to rounding
            return _close("quantized", outputs[0], a["codebook"][indices], 1e-5)
        want = dist.gather(1, indices.reshape(-1, 1)).reshape(outputs[1].shape)
        return _close("distance", outputs[1], want, max(tol, 1e-3))
    for i, (got, want) in enumerate(zip(outputs, expected)):
        problem = _close(f"output {i}", got, want, tol)
        if problem:
            return problem
    return None


def main(cases_json: str) -> None:
    torch.set_num_threads(2)
    for case in json.loads(cases_json):
        print(run_case(*case), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
