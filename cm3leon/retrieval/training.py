"""Training the dual encoder: symmetric InfoNCE over in-batch negatives with a learned temperature.

For a batch of N ``(image, caption)`` pairs with L2-normalised embeddings ``I`` and ``T``, the logits are
``s · I Tᵀ`` (``s = 1 / temperature``, learned) and the loss is the mean of the cross entropies of rows
(image -> its caption) and columns (caption -> its image).
"""
from __future__ import annotations

import math
import time
from os import PathLike
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._checks import check_int
from .config import DualEncoderConfig
from .encoder import DualEncoder

__all__ = ["PairSource", "TrainResult", "contrastive_loss", "train_dual_encoder"]


class PairSource(Protocol):
    """``(image uint8 [3, H, W], caption)`` items by index (``ShapesCaptions``, ``ImageCaptionFolder``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]: ...


class TrainResult(NamedTuple):
    encoder: DualEncoder              # eval mode
    history: list[dict[str, float]]   # one entry per logged step
    seconds: float


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE ``(CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)) / 2`` for matching rows of ``[N, E]``."""
    logits = scale * image_emb @ text_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_dual_encoder(config: DualEncoderConfig | str, pairs: PairSource, text_tokenizer, steps: int, *,
                       batch_size: int = 128, lr: float = 1e-3, warmup: int = 20, weight_decay: float = 0.05,
                       seed: int = 0, encoder: DualEncoder | None = None, progress: bool = True,
                       log_every: int = 10, checkpoint: str | PathLike | None = None,
                       time_limit: float | None = None, grad_clip: float | None = 1.0) -> TrainResult:
    """Trains a :class:`DualEncoder` with the symmetric contrastive loss (AdamW, warmup + cosine decay).

    Args:
        config: a :class:`DualEncoderConfig` or preset name (``text_vocab_size`` is set from the tokenizer).
        pairs: indexable ``(image, caption)`` items; each step draws ``batch_size`` distinct random items.
        text_tokenizer: tokenizes the captions (``encode(str) -> list[int]``).
        steps: optimizer steps.
        batch_size: pairs per step (the in-batch negatives); at most ``len(pairs)``.
        lr / warmup / weight_decay: AdamW schedule.
        seed: seeds initialisation and batch sampling.
        encoder: continue training this model instead of a fresh one (its config wins).
        progress: show a tqdm bar with the loss and the temperature.
        log_every: record the history every this many steps (and at the last step).
        checkpoint: if given, the trained encoder is saved there (safetensors).
        time_limit: stop early after this many seconds (the schedule still assumes ``steps``).
        grad_clip: clip the gradient's global norm to this (None: no clipping); without it, learning rates
            of a few 1e-3 collapsed the demo encoder to constant embeddings (the chance-level loss).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        check_int(name, value, 1)
    if not (hasattr(pairs, "__len__") and hasattr(pairs, "__getitem__")):
        raise TypeError(f"pairs must be indexable (image, caption) items, got {type(pairs).__name__}")
    if batch_size > len(pairs):
        raise ValueError(f"batch_size ({batch_size}) is larger than pairs ({len(pairs)} items)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if encoder is None:
        if isinstance(config, str):
            config = DualEncoderConfig.preset(config, text_vocab_size=text_tokenizer.vocab_size)
        encoder = DualEncoder(config)
    decay = [p for n, p in encoder.named_parameters() if p.ndim >= 2 and "pos" not in n]
    no_decay = [p for n, p in encoder.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    encoder.train()
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="dual encoder", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        items = [pairs[i] for i in torch.randperm(len(pairs), generator=gen)[:batch_size].tolist()]
        images = torch.stack([image for image, _ in items])
        ids = [text_tokenizer.encode(text) for _, text in items]
        loss = contrastive_loss(encoder.encode_images(images), encoder.encode_texts(ids),
                                encoder.temperature_scale())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), grad_clip)
        opt.step()
        out_of_time = time_limit is not None and time.perf_counter() - start > time_limit
        if step % log_every == 0 or step == steps - 1 or out_of_time:
            entry = {"step": step, "loss": loss.item(), "temperature": 1.0 / encoder.temperature_scale().item(),
                     "seconds": time.perf_counter() - start}
            history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", temp=f"{entry['temperature']:.4f}")
        if out_of_time:
            break
    bar.close()
    encoder.eval()
    if checkpoint is not None:
        encoder.save(checkpoint)
    return TrainResult(encoder, history, time.perf_counter() - start)
