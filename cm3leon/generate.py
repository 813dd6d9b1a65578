"""Batched generation: prefill + decode with a static KV cache, CFG streams as rows of one batch.

Every request of a batch is decoded in lockstep. With classifier-free guidance each request contributes one
row per stream (unconditional first, then conditional, as ``cfg_sample`` expects); the sampled token is
appended to all of its streams. Randomness is keyed by (seed, request, step), so a request's tokens do not
depend on which other requests share its batch.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import cm3leon_kernels as ck

from ._checks import check_int, is_int
from .kv_cache import KVCache
from .model import CM3Leon

Prompt = Sequence[int]
# (tokens [B, 1], cache, vocab_range) -> last-position logits [B, V] over vocab_range (all ids when None)
DecodeStep = Callable[[torch.Tensor, KVCache, "tuple[int, int] | None"], torch.Tensor]


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each token.

    Attributes:
        temperature: 0 = greedy. top_k / top_p / min_p: filters applied in that order (0 / 1.0 / 0.0 = off).
        guidance_scale: CFG scale ``s`` for two streams (``u + s·(c − u)``), or ``(s_img, s_txt)`` for
            three-stream instruct CFG; ignored without unconditional prompts.
        allowed_range: restrict sampling to ids in ``[lo, hi)`` (e.g. the image-token range).
        contrastive: use CD-K (expert = conditional stream, amateur = unconditional) instead of CFG;
            ``cd_alpha`` and ``cd_k`` are its head-set parameters.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    guidance_scale: float | tuple[float, float] = 3.0
    allowed_range: tuple[int, int] | None = None
    contrastive: bool = False
    cd_alpha: float = 0.1
    cd_k: int = 1

    def __post_init__(self) -> None:
        # Options are grouped by hashing them: a list here failed later as "unhashable type: 'list'".
        for name in ("guidance_scale", "allowed_range"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))


def _prefill(model: CM3Leon, rows: list[Prompt], cache: KVCache, vocab_range: tuple[int, int] | None
             ) -> torch.Tensor:
    """Fills the cache with every row's prompt and returns each row's last-position logits (over
    ``vocab_range`` only, when given).

    Identical prompts (the samples of one caption, the shared unconditional prompt) are run once: the distinct
    prompts are prefilled right-padded in a cache of their own, whose keys/values are then copied to every
    row that holds them.
    """
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("every prompt (and unconditional prompt) must hold at least one token")
    device = cache.seqlens.device
    first: dict[tuple[int, ...], int] = {}
    inverse = [first.setdefault(tuple(r), len(first)) for r in rows]
    unique = list(first)
    longest = max(lengths)
    padded = torch.zeros(len(unique), longest, dtype=torch.long)
    for i, row in enumerate(unique):
        padded[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    shared = len(unique) < len(rows)
    target = model.allocate_cache(len(unique), longest) if shared else cache
    hidden = model.step_hidden(padded.to(device), target)
    # Padding after a row's prompt was appended to its cache too; rewinding the fill length makes the next
    # append overwrite it, and causal masking kept it invisible to the real tokens.
    unique_lengths = torch.tensor([len(r) for r in unique], device=device)
    last = model.logits(hidden[torch.arange(len(unique), device=device), unique_lengths - 1], vocab_range)
    cache.seqlens.copy_(torch.as_tensor(lengths, dtype=torch.int32))
    if not shared:
        return last
    index = torch.tensor(inverse, device=device)
    cache.k[:, :, :longest] = target.k.index_select(1, index)
    cache.v[:, :, :longest] = target.v.index_select(1, index)
    return last.index_select(0, index)


def unchecked_decode_step(model: CM3Leon, tokens: torch.Tensor, cache: KVCache,
                          vocab_range: tuple[int, int] | None) -> torch.Tensor:
    """One unchecked decode step: ``tokens [B, 1]`` -> last-position logits ``[B, V]`` (``V = hi - lo`` with
    ``vocab_range``)."""
    return model.logits(model.step_hidden(tokens, cache, validate=False)[:, -1], vocab_range)


def compile_decode_step(model: CM3Leon, **compile_kwargs) -> DecodeStep:
    """A ``torch.compile``d decode step (``fullgraph=True``) for :func:`generate`'s ``decode_step``.

    The step (:func:`unchecked_decode_step`) runs without host-side checks, so the compiled graph has no
    data-dependent branches; its shapes are static per (batch, cache length), so it compiles once per request
    shape. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="reduce-overhead"`` for CUDA graphs on a
    GPU, or ``backend="aot_eager"`` to trace without code generation).
    """
    def step(tokens: torch.Tensor, cache: KVCache, vocab_range: tuple[int, int] | None) -> torch.Tensor:
        return unchecked_decode_step(model, tokens, cache, vocab_range)

    return torch.compile(step, fullgraph=True, **compile_kwargs)


@torch.no_grad()
def generate(model: CM3Leon, prompts: Sequence[Prompt], *, max_new_tokens: int,
             unconditional_prompts: Sequence[Prompt] | None = None,
             image_conditional_prompts: Sequence[Prompt] | None = None,
             options: SamplingOptions | Sequence[SamplingOptions] = SamplingOptions(),
             stop_tokens: Sequence[int] = (), seeds: int | Sequence[int] = 0,
             allowed_mask: torch.Tensor | None = None, stop_check_every: int = 16,
             decode_step: DecodeStep | None = None, progress: bool = False) -> list[list[int]]:
    """Samples up to ``max_new_tokens`` tokens after each prompt.

    Args:
        prompts: token ids of each request (the conditional stream).
        unconditional_prompts: one per request to enable CFG / CD-K (e.g. the prompt with its text replaced by
            ``<mask>``); the sampled token is appended to every stream of the request.
        image_conditional_prompts: third stream for instruct CFG (``guidance_scale=(s_img, s_txt)``); stream
            order is unconditional, image-conditional, full prompt.
        options: one :class:`SamplingOptions` for every request, or one per request (e.g. half the samples
            with CFG + top-p and half with CD-K); all requests still decode as one batch.
        stop_tokens: a request ends after sampling one of these (the stop token is not returned).
        seeds: one int for all requests (request ``i`` then uses ``seed + i``) or one seed per request.
        allowed_mask: optional bool ``[vocab]``: only these ids may be sampled (intersected with each
            option's ``allowed_range``), e.g. text ids plus the stop tokens.
        stop_check_every: the loop reads "have all requests stopped?" back from the device only every this
            many steps (tokens sampled after a request's stop token are discarded), so decoding never waits
            for the device in between.
        decode_step: replaces :func:`unchecked_decode_step` for the decode steps, e.g. :func:`compile_decode_step`'s
            compiled step.
        progress: show a tqdm bar over decode steps.

    Returns:
        The generated token ids of each request.
    """
    n = len(prompts)
    if n == 0:
        return []
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    stop_check_every = check_int("stop_check_every", stop_check_every, 1)
    streams = [("prompts", prompts)]
    if image_conditional_prompts is not None:
        if unconditional_prompts is None:
            raise ValueError("image_conditional_prompts needs unconditional_prompts too (three-stream CFG)")
        streams = [("unconditional_prompts", unconditional_prompts),
                   ("image_conditional_prompts", image_conditional_prompts), ("prompts", prompts)]
    elif unconditional_prompts is not None:
        streams = [("unconditional_prompts", unconditional_prompts), ("prompts", prompts)]
    for _, stream in streams:
        if len(stream) != n:
            raise ValueError(f"every stream needs one prompt per request ({n}), got {len(stream)}")
    n_streams = len(streams)
    device = model.embed.weight.device
    groups, vocab_range = _option_groups(options, n, n_streams, device, allowed_mask is not None,
                                         model.config.vocab_size)
    # stream-major: row = stream * n + request
    rows = [_int_list(f"{name}[{i}]", p, "int token id")
            for name, stream in streams for i, p in enumerate(stream)]
    longest = max(len(r) for r in rows) + max_new_tokens
    if longest > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {longest} exceeds the model's max_seq_len "
                         f"{model.config.max_seq_len}")
    seed_t = torch.as_tensor(_seed_list(seeds, n), dtype=torch.int64, device=device)
    stops = torch.as_tensor(_stop_list(stop_tokens, model.config.vocab_size), dtype=torch.long, device=device)
    if allowed_mask is not None:
        if not isinstance(allowed_mask, torch.Tensor) or allowed_mask.dtype != torch.bool \
                or allowed_mask.shape != (model.config.vocab_size,):
            raise ValueError(f"allowed_mask must be a bool tensor [{model.config.vocab_size}]")
        allowed_mask = allowed_mask.to(device)
    step_fn = decode_step or functools.partial(unchecked_decode_step, model)
    offset = 0 if vocab_range is None else vocab_range[0]

    cache = model.allocate_cache(len(rows), longest)
    logits = _prefill(model, rows, cache, vocab_range)  # validates the prompts' ids once
    out = torch.empty(n, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
    # The step is a device tensor advanced in place: nothing in the loop reads a value back to the host except
    # the "all stopped?" test every stop_check_every steps.
    step_t = torch.zeros((), dtype=torch.int64, device=device)
    bar = tqdm(total=max_new_tokens, disable=not progress, desc="decode", unit="tok")
    for step in range(max_new_tokens):
        # The samplers read any dtype and any row/stream strides (fp32 math): no copy of the logits per step.
        token = _sample_groups(logits.view(n_streams, n, -1), groups, seed_t, step_t, allowed_mask)
        if offset:
            token += offset
        out[:, step] = token
        bar.update()
        if stops.numel():
            hit = torch.isin(token, stops) & ~done
            lengths = torch.where(hit, step_t, lengths)
            done |= hit
            if (step + 1) % stop_check_every == 0 and bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        logits = step_fn(token.repeat(n_streams)[:, None], cache, vocab_range)
        step_t += 1
    bar.close()
    lengths = lengths.clamp_(max=step + 1).tolist()
    out = out.cpu()
    return [out[i, : lengths[i]].tolist() for i in range(n)]


def _int_list(name: str, values: Sequence[int], what: str) -> list[int]:
    """A sequence (or tensor / numpy array) of ints as Python ints: torch.as_tensor(dtype=long) would truncate
    floats and take bools as 0/1 without a word."""
    if hasattr(values, "tolist") and hasattr(values, "ndim"):
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of {what}s, got {type(values).__name__}")
    bad = next((j for j, v in enumerate(values) if not is_int(v)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] must be an {what}, got {values[bad]!r}")
    return [operator.index(v) for v in values]


def _stop_list(stop_tokens: Sequence[int], vocab_size: int) -> list[int]:
    stops = _int_list("stop_tokens", stop_tokens, "int token id")
    # an id the model cannot sample would never stop anything: most likely a vocabulary mix-up
    bad = next((t for t in stops if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"stop_tokens must be ids in [0, {vocab_size}), got {bad}")
    return stops


def _seed_list(seeds: int | Sequence[int], n: int) -> list[int]:
    if hasattr(seeds, "tolist") and hasattr(seeds, "ndim"):  # a tensor or numpy array (or numpy scalar)
        seeds = seeds.tolist()
    if is_int(seeds):  # an int or e.g. numpy.int64
        seed_list = [operator.index(seeds) + i for i in range(n)]
    elif isinstance(seeds, Sequence) and not isinstance(seeds, (str, bytes)):
        seed_list = _int_list("seeds", seeds, "int")
    else:
        raise TypeError(f"seeds must be an int or a sequence of ints, got {type(seeds).__name__}")
    if len(seed_list) != n:
        raise ValueError(f"seeds must be an int or one seed per request ({n}), got {len(seed_list)}")
    if not all(-(1 << 63) <= s < 1 << 63 for s in seed_list):
        raise ValueError(f"seeds must fit in int64, got {seed_list}")
    return seed_list


def _option_groups(options: SamplingOptions | Sequence[SamplingOptions], n: int, n_streams: int,
                   device: torch.device, masked: bool, vocab_size: int
                   ) -> tuple[list[tuple[SamplingOptions, torch.Tensor | None]], tuple[int, int] | None]:
    """Requests grouped by identical options: ``(options, request indices or None for all of them)``, and the
    id range every request samples from when they all share one ``allowed_range`` (and no ``allowed_mask``):
    then only that slice of the logits is computed and the groups' options sample within it (ids shifted)."""
    if isinstance(options, SamplingOptions):
        per_request = [options] * n
    elif isinstance(options, Sequence) and all(isinstance(o, SamplingOptions) for o in options):
        per_request = list(options)
        if len(per_request) != n:
            raise ValueError(f"options must be one SamplingOptions or one per request ({n}), got {len(per_request)}")
    else:
        raise TypeError("options must be a SamplingOptions or a sequence of them (one per request)")
    for o in per_request:
        if o.contrastive and n_streams != 2:
            raise ValueError("contrastive decoding needs exactly one unconditional prompt per request (the amateur)")
    ranges = {o.allowed_range for o in per_request}
    vocab_range = next(iter(ranges)) if len(ranges) == 1 and not masked else None
    if vocab_range is not None:
        lo, hi = vocab_range
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (lo, hi)) or not 0 <= lo < hi <= vocab_size:
            raise ValueError(f"allowed_range must be a pair of ints with 0 <= lo < hi <= vocab_size = {vocab_size}, "
                             f"got {vocab_range}")
        per_request = [dataclasses.replace(o, allowed_range=None) for o in per_request]
    members: dict[SamplingOptions, list[int]] = {}
    for i, o in enumerate(per_request):
        members.setdefault(o, []).append(i)
    if len(members) == 1:
        return [(per_request[0], None)], vocab_range
    return [(o, torch.as_tensor(idx, dtype=torch.long, device=device)) for o, idx in members.items()], vocab_range


def _sample_groups(per_stream: torch.Tensor, groups: list[tuple[SamplingOptions, torch.Tensor | None]],
                   seeds: torch.Tensor, step: torch.Tensor, allowed_mask: torch.Tensor | None) -> torch.Tensor:
    """per_stream [n_streams, n, V] -> tokens [n], each group of requests sampled with its own options."""
    if len(groups) == 1:
        return _sample(per_stream, groups[0][0], seeds, step, allowed_mask)
    tokens = torch.empty(per_stream.shape[1], dtype=torch.long, device=per_stream.device)
    for options, index in groups:
        tokens.index_copy_(0, index, _sample(per_stream[:, index], options, seeds[index], step, allowed_mask))
    return tokens


def _sample(per_stream: torch.Tensor, options: SamplingOptions, seeds: torch.Tensor, step: torch.Tensor,
            allowed_mask: torch.Tensor | None) -> torch.Tensor:
    """per_stream [n_streams, n, V] -> tokens [n]."""
    if options.contrastive:
        return ck.contrastive_sample(per_stream[1], per_stream[0], alpha=options.cd_alpha, k=options.cd_k,
                                     temperature=options.temperature, allowed_range=options.allowed_range,
                                     allowed_mask=allowed_mask, seed=seeds, step=step)
    logits = per_stream.transpose(0, 1)  # [n, streams, V], a strided view
    return ck.cfg_sample(logits, guidance_scale=options.guidance_scale if logits.shape[1] > 1 else 1.0,
                         temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                         min_p=options.min_p, allowed_range=options.allowed_range, allowed_mask=allowed_mask,
                         seed=seeds, step=step)
