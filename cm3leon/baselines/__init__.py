"""Plain-PyTorch baselines the benchmarks and the demo compare against (not for production use):

- :data:`SDPA`: the model's attention entry points written with ``torch.nn.functional.scaled_dot_product_attention``.
- :func:`hf_style_cfg_generate`: a Python decode loop with a Hugging Face-style logits-processor chain.
"""
from .hf_loop import hf_style_cfg_generate
from .sdpa import SDPA

__all__ = ["SDPA", "hf_style_cfg_generate"]
