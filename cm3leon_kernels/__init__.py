"""cm3leon_kernels: fused CPU/CUDA kernels for token-based multimodal language models.

Drop-in ops, registered with ``torch.library`` as ``torch.ops.cm3leon.*`` (so ``torch.compile`` traces them):

- Attention (FlashAttention 2.8's API): :func:`flash_attn_func`, :func:`flash_attn_varlen_func`,
  :func:`flash_attn_with_kvcache` and the packed variants :func:`flash_attn_qkvpacked_func`,
  :func:`flash_attn_kvpacked_func`, :func:`flash_attn_varlen_qkvpacked_func`,
  :func:`flash_attn_varlen_kvpacked_func`; padding helpers in :mod:`cm3leon_kernels.bert_padding`.
- VQ codebook lookup: :func:`vq_nearest`, :func:`vq_embed`, :func:`vector_quantize`.
- Sampling: :func:`cfg_sample` (CFG / instruct CFG with top-k/top-p/min-p), :func:`contrastive_sample` (CD-K).
- Loss: :func:`linear_cross_entropy` (the LM head's cross-entropy without materialising the logits).

``cm3leon_kernels.reference`` holds the plain-PyTorch versions used as test oracle and benchmark baseline.
"""
from ._native import cpu_features, cuda_built
from .flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                   flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                   flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from .loss import linear_cross_entropy, linear_cross_entropy_supports
from .sampling import cfg_sample, contrastive_sample
from .vq import VQOutput, vector_quantize, vq_embed, vq_nearest

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "vq_nearest", "vq_embed", "vector_quantize", "VQOutput",
           "cfg_sample", "contrastive_sample", "linear_cross_entropy",
           "linear_cross_entropy_supports", "cuda_built", "cpu_features"]
