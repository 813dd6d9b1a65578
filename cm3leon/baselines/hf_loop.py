"""The plain decode loop a user without our kernels would run: one model step per token and a Hugging
Face-style logits-processor chain (vocabulary mask, CFG mix, temperature, top-p by a full sort, softmax,
multinomial) with a stopping check per token, as ``transformers.generate`` does. A baseline for comparisons,
not an implementation to use.
"""
from __future__ import annotations

import torch

from cm3leon.model import CM3Leon
from cm3leon_kernels import reference


@torch.no_grad()
def hf_style_cfg_generate(model: CM3Leon, prompts, uncond, image_range, steps: int, *, guidance_scale=3.0,
                      top_p=0.9) -> torch.Tensor:
    """The plain loop: prefill both streams, then per token run the processor chain and one model step."""
    n, rows = len(prompts), uncond + prompts
    cache = model.allocate_cache(len(rows), max(map(len, rows)) + steps)
    padded = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in rows])
    logits = model.step(padded, cache)[torch.arange(len(rows)), lengths - 1]
    cache.seqlens.copy_(lengths.int())
    blocked = torch.ones(model.config.vocab_size, dtype=torch.bool)
    blocked[image_range[0]: image_range[1]] = False
    out = []
    for _ in range(steps):
        # The vocabulary processor masks the guided scores; with u = 0 and c = -inf on blocked ids the chain's
        # own CFG mix u + s·(c − u) gives exactly -inf there (masking both streams would give NaN).
        uncond_logits, cond_logits = logits.view(2, n, -1)
        scores = torch.stack([uncond_logits.masked_fill(blocked, 0.0),
                              cond_logits.masked_fill(blocked, float("-inf"))], dim=1)
        token = reference.hf_chain_sample(scores, guidance_scale=guidance_scale, temperature=1.0, top_p=top_p)
        out.append(token)
        if bool((token == 1).all()):  # the stopping-criteria check transformers runs every step
            break
        logits = model.step(token.repeat(2)[:, None], cache)[:, -1]
    return torch.stack(out, 1)

