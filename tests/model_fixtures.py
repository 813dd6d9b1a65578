"""Small models shared by the model/generation tests."""
from __future__ import annotations

import torch

from cm3leon.config import CM3LeonConfig
from cm3leon.model import CM3Leon

LAYOUTS = {
    # The CM3Leon (OPT-like) layout with a non-zero init so the test sees every block's contribution.
    "cm3leon": CM3LeonConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.05,
                             zero_init_output_proj=False),
    # Chameleon layout with GQA.
    "chameleon": CM3LeonConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80,
                               max_seq_len=64, norm="rmsnorm", norm_affine=True, positions="rope",
                               activation="swiglu", qk_norm=True, tie_embeddings=False, init_std=0.05,
                               zero_init_output_proj=False),
}


def small_model(layout: str, seed: int = 0) -> CM3Leon:
    torch.manual_seed(seed)
    return CM3Leon(LAYOUTS[layout]).eval()
