"""Fused, sort-free token sampling: classifier-free guidance (CFG) and contrastive decoding (CD-K).

One kernel call per decode step samples every row of the batch in a single fused pass per row: the guidance
streams are mixed on the fly, the vocabulary restricted, temperature/top-k/top-p/min-p applied as thresholds
(radix selection, no sort of the vocabulary), and one token drawn by inverse CDF with a counter-based
Philox4x32-10 uniform keyed by (seed, row, step). See docs/sampling.md for the exact semantics.

Randomness (identical on CPU and CUDA):

- ``seed`` an int ``s``: row ``r`` of the batch draws from the stream (key ``s``, row ``r``, ``step``).
- ``seed`` an int64 tensor ``[B]``: row ``r`` draws from (key ``seed[r]``, row 0, ``step``), so a request's
  tokens do not depend on the batch it rides in or its position there: sampling it alone with
  ``seed=s`` (``B = 1``) or ``seed=torch.tensor([s])`` gives the same token.
- ``step`` an int >= 0 or an int64 tensor with one element (so a compiled/captured decode loop can advance
  it without retracing).
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

from ._checks import (FLOAT_DTYPES, as_int, check_fake_devices, check_same_device, check_supported_device,
                      check_tensor, is_finite)
from ._native import cuda_built, ops

__all__ = ["cfg_sample", "contrastive_sample"]

_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64
# Devices with kernels: CUDA when this build has the CUDA kernels (csrc/sampling/sampling_cuda_*.cu).
_DEVICES = ("cpu", "cuda") if cuda_built() else ("cpu",)


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)  # numbers.Real: also numpy scalars


# The checks below run on every decode step: exact-type fast paths first (per-call overhead matters).

def _check_real(name: str, x: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if (type(x) is float or type(x) is int or _is_number(x)) and x - x == 0 \
            and (lo < x or (x == lo and not lo_open)) and x <= hi:  # x - x == 0: finite (rejects NaN, inf)
        return float(x)
    bracket = "(" if lo_open else "["
    upper = f"{hi})" if math.isinf(hi) else f"{hi}]"
    raise ValueError(f"{name} must be a finite number in {bracket}{lo}, {upper}, got {x!r}")


def _check_int(name: str, x: object, lo: int, hi: int) -> int:
    x = as_int(name, x)
    if not lo <= x <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")
    return x


def _seed_args(seed: int | torch.Tensor, batch: int, device: torch.device) -> tuple[int, torch.Tensor | None]:
    if isinstance(seed, torch.Tensor):
        check_tensor("seed", seed, dtypes=(torch.int64,), ndim=1)
        if seed.shape[0] != batch:
            raise ValueError(f"seed tensor must have one seed per row: shape [{batch}], got {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed tensor must be on the logits' device {device}, got {seed.device}")
        return 0, seed.contiguous()
    if type(seed) is not int:
        if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):
            raise TypeError(f"seed must be an int or an int64 tensor of per-row seeds, got {type(seed).__name__}")
        seed = operator.index(seed)
    if not _INT64_MIN <= seed < _UINT64_END:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    return (seed - _UINT64_END if seed >= 1 << 63 else seed), None  # same 64 bits as an int64


def _step_args(step: int | torch.Tensor, device: torch.device) -> tuple[int, torch.Tensor | None]:
    if isinstance(step, torch.Tensor):
        check_tensor("step", step, dtypes=(torch.int64,))
        if step.numel() != 1:
            raise ValueError(f"step tensor must hold one element, got shape {tuple(step.shape)}")
        if step.device != device and step.device.type != "cpu":  # a CPU step is read on the host
            raise ValueError(f"step tensor must be on the CPU or the logits' device ({device}), "
                             f"got {step.device}")
        return 0, step
    return _check_int("step", step, 0, (1 << 63) - 1), None


def _vocab_args(allowed_range: Sequence[int] | None, allowed_mask: torch.Tensor | None, batch: int, vocab: int,
                device: torch.device) -> tuple[int, int]:
    lo, hi = 0, vocab
    if allowed_range is not None:
        if not isinstance(allowed_range, (tuple, list)) or len(allowed_range) != 2:
            raise TypeError(f"allowed_range must be a pair of ints (lo, hi), got {allowed_range!r}")
        lo, hi = (as_int("allowed_range entries", v) for v in allowed_range)  # ints or integer scalars, not bools
        if not 0 <= lo < hi <= vocab:
            raise ValueError(f"allowed_range must satisfy 0 <= lo < hi <= V = {vocab}, got {tuple(allowed_range)}")
    if allowed_mask is not None:
        check_tensor("allowed_mask", allowed_mask, dtypes=(torch.bool,))
        if allowed_mask.shape not in ((vocab,), (batch, vocab)):
            raise ValueError(f"allowed_mask must be [V] = [{vocab}] or [B, V] = [{batch}, {vocab}], "
                             f"got {tuple(allowed_mask.shape)}")
        if allowed_mask.device != device:
            raise ValueError(f"allowed_mask must be on the logits' device {device}, got {allowed_mask.device}")
    return lo, hi


def _guidance_args(guidance_scale: object, streams: int) -> list[float]:
    if streams == 1:
        if guidance_scale is not None and guidance_scale != 1:
            raise ValueError(f"guidance_scale must be None (or 1) for S = 1 stream, got {guidance_scale!r}")
        return []
    if streams == 2:
        if not _is_number(guidance_scale) or not is_finite(guidance_scale):
            raise ValueError(
                f"guidance_scale must be a finite number for S = 2 streams (CFG), got {guidance_scale!r}")
        return [float(guidance_scale)]
    if (not isinstance(guidance_scale, (tuple, list)) or len(guidance_scale) != 2
            or not all(_is_number(s) and is_finite(s) for s in guidance_scale)):
        raise ValueError("guidance_scale must be a pair (s_img, s_txt) of finite numbers for S = 3 streams "
                         f"(instruct CFG), got {guidance_scale!r}")
    return [float(s) for s in guidance_scale]


def cfg_sample(logits: torch.Tensor, *, guidance_scale: float | Sequence[float] | None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
               allowed_range: Sequence[int] | None = None, allowed_mask: torch.Tensor | None = None,
               seed: int | torch.Tensor, step: int | torch.Tensor, return_logprobs: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Samples one token per row from guided logits in one fused pass.

    Args:
        logits: ``[B, S, V]`` float32/bfloat16/float16, contiguous along V. Streams: S = 1 plain;
            S = 2 CFG ``u + s·(c − u)`` with index 0 = unconditional ``u``, 1 = conditional ``c``;
            S = 3 instruct CFG ``u + s_img·(img − u) + s_txt·(full − img)`` with index 0 = ``u``,
            1 = ``img`` (image-conditioned), 2 = ``full`` (image + text). A ``-inf`` in any stream excludes
            the token; NaN/+inf raise.
        guidance_scale: None (or 1) for S = 1, a number ``s`` for S = 2, a pair ``(s_img, s_txt)`` for S = 3.
        temperature: >= 0; 0 is greedy (argmax of the mixed logits, lowest index on ties).
        top_k: keep the tokens whose logit is >= the k-th largest (ties at the boundary are kept); 0 = off.
        top_p: in (0, 1]: keep token x iff the probability of the tokens strictly more likely than x is
            < top_p (after top-k, renormalised); 1 = off.
        min_p: in [0, 1]: keep tokens with p(x) >= min_p · max p; 0 = off.
        allowed_range: ``(lo, hi)``, only tokens in ``[lo, hi)`` may be drawn (e.g. image tokens).
        allowed_mask: bool ``[V]`` or ``[B, V]``; only True tokens may be drawn (intersected with the range).
        seed: int, or int64 ``[B]`` per-row seeds (see the module docstring for the exact streams).
        step: int >= 0 or one-element int64 tensor: the decode step (advance it every call).
        return_logprobs: also return the float32 log-probability of each drawn token under the final
            (filtered, renormalised) distribution; 0 for greedy rows.

    Order: mix streams → restrict vocabulary → temperature → top-k → top-p → min-p → draw.

    Returns:
        int64 tokens ``[B]``, or ``(tokens, logprobs)``.

    Raises:
        TypeError / ValueError naming the argument; ValueError for NaN/+inf logits or a row with no allowed
        token.
    """
    if type(logits) is not torch.Tensor or logits.dtype not in FLOAT_DTYPES or logits.dim() != 3:
        check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=3)
    batch, streams, vocab = logits.shape
    if streams not in (1, 2, 3):
        raise ValueError(f"logits must have S = 1, 2 or 3 streams (dim 1), got shape {tuple(logits.shape)}")
    if vocab == 0:
        raise ValueError("logits has an empty vocabulary (V = 0)")
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    scales = _guidance_args(guidance_scale, streams)
    temperature = _check_real("temperature", temperature, 0.0, math.inf)
    top_k = _check_int("top_k", top_k, 0, vocab)
    top_p = _check_real("top_p", top_p, 0.0, 1.0, lo_open=True)
    min_p = _check_real("min_p", min_p, 0.0, 1.0)
    if logits.device.type != "cpu":
        check_supported_device("logits", logits, _DEVICES)
    lo, hi = _vocab_args(allowed_range, allowed_mask, batch, vocab, logits.device)
    seed_int, seeds = _seed_args(seed, batch, logits.device)
    step_int, step_tensor = _step_args(step, logits.device)
    tokens, logprobs = ops.cfg_sample(logits, scales, temperature, top_k, top_p, min_p, lo, hi,
                                      None if allowed_mask is None else allowed_mask.contiguous(),
                                      seed_int, seeds, step_int, step_tensor)
    return (tokens, logprobs) if return_logprobs else tokens


def contrastive_sample(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, *, alpha: float = 0.1,
                       k: int = 1, temperature: float = 1.0, amateur_temperature: float = 1.0,
                       allowed_range: Sequence[int] | None = None, allowed_mask: torch.Tensor | None = None,
                       seed: int | torch.Tensor, step: int | torch.Tensor, return_logprobs: bool = False
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Contrastive decoding, top-k variant (CD-K, docs/recipe.md §5), one fused pass per row.

    With ``p_exp = softmax(expert)`` and ``p_ama = softmax(amateur / amateur_temperature)`` over the allowed
    vocabulary, the head set is ``{x : p_exp(x) >= alpha · kth_largest_k(p_exp)}`` and the score
    ``log p_exp(x) − log p_ama(x)`` on it (−inf elsewhere). The token is drawn from
    ``softmax(score / temperature)``; ``temperature = 0`` takes the argmax of the score (the original
    greedy contrastive decoding; lowest index on ties). The head set uses the expert at temperature 1: an
    expert temperature ``t`` is the same as ``alpha ** t`` with ``temperature=t`` and
    ``amateur_temperature / t`` here.

    Args:
        expert_logits, amateur_logits: ``[B, V]``, same dtype (float32/bfloat16/float16). In CM3Leon the
            expert is the conditional stream and the amateur the unconditional one. ``-inf`` in either
            excludes the token; NaN/+inf raise.
        alpha: in [0, 1] (0 keeps every allowed token in the head set).
        k: in [1, V]; the k-th largest expert probability sets the head threshold (k larger than the
            number of allowed tokens means the smallest allowed one). k = 1 is the original CD.
        temperature: >= 0, sampling temperature of the scores.
        amateur_temperature: > 0.
        allowed_range, allowed_mask, seed, step, return_logprobs: as in :func:`cfg_sample`.

    Returns:
        int64 tokens ``[B]``, or ``(tokens, logprobs)`` (log-probability under ``softmax(score / T)`` on the
        head set; 0 for greedy).
    """
    check_tensor("expert_logits", expert_logits, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("amateur_logits", amateur_logits, dtypes=FLOAT_DTYPES, ndim=2)
    if amateur_logits.shape != expert_logits.shape:
        raise ValueError(f"amateur_logits must have expert_logits' shape {tuple(expert_logits.shape)}, "
                         f"got {tuple(amateur_logits.shape)}")
    if amateur_logits.dtype != expert_logits.dtype:
        raise TypeError(f"expert_logits and amateur_logits must share a dtype, got {expert_logits.dtype} "
                        f"and {amateur_logits.dtype}")
    batch, vocab = expert_logits.shape
    if vocab == 0:
        raise ValueError("expert_logits has an empty vocabulary (V = 0)")
    check_same_device(expert_logits=expert_logits, amateur_logits=amateur_logits)
    check_supported_device("expert_logits", expert_logits, _DEVICES)
    if expert_logits.stride(1) != 1:
        expert_logits = expert_logits.contiguous()
    if amateur_logits.stride(1) != 1:
        amateur_logits = amateur_logits.contiguous()
    alpha = _check_real("alpha", alpha, 0.0, 1.0)
    k = _check_int("k", k, 1, vocab)
    temperature = _check_real("temperature", temperature, 0.0, math.inf)
    amateur_temperature = _check_real("amateur_temperature", amateur_temperature, 0.0, math.inf, lo_open=True)
    lo, hi = _vocab_args(allowed_range, allowed_mask, batch, vocab, expert_logits.device)
    seed_int, seeds = _seed_args(seed, batch, expert_logits.device)
    step_int, step_tensor = _step_args(step, expert_logits.device)
    tokens, logprobs = ops.contrastive_sample(expert_logits, amateur_logits, alpha, k, temperature,
                                              amateur_temperature, lo, hi,
                                              None if allowed_mask is None else allowed_mask.contiguous(),
                                              seed_int, seeds, step_int, step_tensor)
    return (tokens, logprobs) if return_logprobs else tokens


# ---- torch.library registration: fake (meta) kernels for tracing (sampling has no gradient) -------------

def _sample_fake(op: str, batch_source: torch.Tensor, **tensors: torch.Tensor | None):
    # The step counter may stay on the CPU beside CUDA logits (the CUDA kernel reads it on the host).
    check_fake_devices(op, cpu_ok=("step_tensor",), **tensors)
    batch = batch_source.shape[0]
    return (batch_source.new_empty((batch,), dtype=torch.int64),
            batch_source.new_empty((batch,), dtype=torch.float32))


@torch.library.register_fake("cm3leon::cfg_sample")
def _cfg_sample_fake(logits, guidance_scale, temperature, top_k, top_p, min_p, range_lo, range_hi,
                     allowed_mask, seed, seeds, step, step_tensor):
    return _sample_fake("cfg_sample", logits, logits=logits, allowed_mask=allowed_mask, seeds=seeds,
                        step_tensor=step_tensor)


@torch.library.register_fake("cm3leon::contrastive_sample")
def _contrastive_sample_fake(expert_logits, amateur_logits, alpha, k, temperature, amateur_temperature,
                             range_lo, range_hi, allowed_mask, seed, seeds, step, step_tensor):
    return _sample_fake("contrastive_sample", expert_logits, expert_logits=expert_logits,
                        amateur_logits=amateur_logits, allowed_mask=allowed_mask, seeds=seeds,
                        step_tensor=step_tensor)


# Sampling has no gradient: both outputs are marked non-differentiable, so logits that require grad (e.g. a
# training-mode forward) give plain tensors instead of ones whose backward would fail.
def _non_differentiable_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _no_backward(ctx, *grads):
    raise RuntimeError("cm3leon sampling ops are not differentiable")


for _op in ("cm3leon::cfg_sample", "cm3leon::contrastive_sample"):
    torch.library.register_autograd(_op, _no_backward, setup_context=_non_differentiable_setup)
