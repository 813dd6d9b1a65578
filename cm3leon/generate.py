"""Batched generation: prefill + decode with a static KV cache, CFG streams as rows of one batch.

Every request of a batch is decoded in lockstep. With classifier-free guidance each request contributes one
row per stream (unconditional first, then conditional, as ``cfg_sample`` expects); the sampled token is
appended to all of its streams. Randomness is keyed by (seed, request, step), so a request's tokens do not
depend on which other requests share its batch.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import cm3leon_kernels as ck

from .model import CM3Leon

Prompt = Sequence[int]


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


def _prefill(model: CM3Leon, rows: list[Prompt], cache) -> torch.Tensor:
    """Runs every row's prompt (right-padded to one length) and returns each row's last-position logits."""
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("every prompt (and unconditional prompt) must hold at least one token")
    device = cache.seqlens.device
    padded = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    logits = model.step(padded, cache)
    # Padding after a row's prompt was appended to its cache too; rewinding the fill length makes the next
    # append overwrite it, and causal masking kept it invisible to the real tokens.
    length_t = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    cache.seqlens.copy_(length_t)
    return logits[torch.arange(len(rows), device=device), length_t.long() - 1]


@torch.no_grad()
def generate(model: CM3Leon, prompts: Sequence[Prompt], *, max_new_tokens: int,
             unconditional_prompts: Sequence[Prompt] | None = None,
             image_conditional_prompts: Sequence[Prompt] | None = None,
             options: SamplingOptions = SamplingOptions(), stop_tokens: Sequence[int] = (),
             seeds: int | Sequence[int] = 0, progress: bool = False) -> list[list[int]]:
    """Samples up to ``max_new_tokens`` tokens after each prompt.

    Args:
        prompts: token ids of each request (the conditional stream).
        unconditional_prompts: one per request to enable CFG / CD-K (e.g. the prompt with its text replaced by
            ``<mask>``); the sampled token is appended to every stream of the request.
        image_conditional_prompts: third stream for instruct CFG (``guidance_scale=(s_img, s_txt)``); stream
            order is unconditional, image-conditional, full prompt.
        stop_tokens: a request ends after sampling one of these (the stop token is not returned).
        seeds: one int for all requests (request ``i`` then uses ``seed + i``) or one seed per request.
        progress: show a tqdm bar over decode steps.

    Returns:
        The generated token ids of each request.
    """
    n = len(prompts)
    if n == 0:
        return []
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    streams: list[Sequence[Prompt]] = [prompts]
    if image_conditional_prompts is not None:
        if unconditional_prompts is None:
            raise ValueError("image_conditional_prompts needs unconditional_prompts too (three-stream CFG)")
        streams = [unconditional_prompts, image_conditional_prompts, prompts]
    elif unconditional_prompts is not None:
        streams = [unconditional_prompts, prompts]
    for stream in streams:
        if len(stream) != n:
            raise ValueError(f"every stream needs one prompt per request ({n}), got {len(stream)}")
    if options.contrastive and len(streams) != 2:
        raise ValueError("contrastive decoding needs exactly one unconditional prompt per request (the amateur)")
    n_streams = len(streams)
    rows = [list(p) for stream in streams for p in stream]  # stream-major: row = stream * n + request
    longest = max(len(r) for r in rows) + max_new_tokens
    if longest > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {longest} exceeds the model's max_seq_len "
                         f"{model.config.max_seq_len}")

    device = model.embed.weight.device
    if hasattr(type(seeds), "__index__") and not isinstance(seeds, bool):  # an int or e.g. numpy.int64
        seed_list = [operator.index(seeds) + i for i in range(n)]
    elif isinstance(seeds, Sequence):
        seed_list = list(seeds)
    else:
        raise TypeError(f"seeds must be an int or a sequence of ints, got {type(seeds).__name__}")
    if len(seed_list) != n:
        raise ValueError(f"seeds must be an int or one seed per request ({n}), got {len(seed_list)}")
    seed_t = torch.as_tensor(seed_list, dtype=torch.int64, device=device)
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)

    cache = model.allocate_cache(len(rows), max(len(r) for r in rows) + max_new_tokens)
    logits = _prefill(model, rows, cache)
    out = torch.empty(n, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
    for step in tqdm(range(max_new_tokens), disable=not progress, desc="decode", unit="tok"):
        # The samplers read any dtype and any row/stream strides (fp32 math): no copy of the logits per step.
        per_stream = logits.view(n_streams, n, -1)
        token = _sample(per_stream, options, seed_t, step)
        out[:, step] = token
        hit = torch.isin(token, stops) & ~done
        lengths = torch.where(hit, torch.full_like(lengths, step), lengths)
        done |= hit
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        logits = model.step(token.repeat(n_streams)[:, None], cache)[:, -1]
    return [out[i, : min(int(lengths[i]), step + 1)].tolist() for i in range(n)]


def _sample(per_stream: torch.Tensor, options: SamplingOptions, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """per_stream [n_streams, n, V] -> tokens [n]."""
    if options.contrastive:
        return ck.contrastive_sample(per_stream[1], per_stream[0], alpha=options.cd_alpha, k=options.cd_k,
                                     temperature=options.temperature, allowed_range=options.allowed_range,
                                     seed=seeds, step=step)
    logits = per_stream.transpose(0, 1)  # [n, streams, V], a strided view
    return ck.cfg_sample(logits, guidance_scale=options.guidance_scale if logits.shape[1] > 1 else 1.0,
                         temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                         min_p=options.min_p, allowed_range=options.allowed_range, seed=seeds, step=step)
