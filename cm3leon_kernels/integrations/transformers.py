"""Hugging Face transformers integration: ``attn_implementation="cm3leon"``.

    from cm3leon_kernels.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="cm3leon")

:func:`register` adds an attention function to transformers' ``AttentionInterface`` and, under the same name,
the flash-attention mask function to ``AttentionMaskInterface``: models then hand the attention function a 2-D
``(batch, kv_length)`` padding mask (or ``None`` when nothing is padded) instead of a dense 4-D mask. Padded
batches go through :func:`~cm3leon_kernels.flash_attn_varlen_func` (padding is removed, not masked); sliding
windows (Mistral, Gemma-2, ...) become ``window_size``, ``softcap`` is passed through, packed sequences
(``position_ids`` restarting inside one row, or transformers' ``cu_seq_lens_*`` arguments) stay separate
documents, and the attention dropout models pass while training becomes ``dropout_p`` (CPU only). Anything it
cannot honour raises instead of being ignored: attention sinks (``s_aux``), ``output_attentions=True``, a 4-D
custom mask, and unknown keyword arguments.

transformers is imported only by :func:`register` (it is not a dependency of cm3leon_kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bert_padding import index_first_axis, pad_input, unpad_input
from ..flash_attn_interface import flash_attn_func, flash_attn_varlen_func

__all__ = ["NAME", "attention_forward", "register"]

NAME = "cm3leon"

# Keyword arguments transformers' models forward to every attention function that carry nothing this
# function must act on (bookkeeping for caches, generation, outputs and the loss: Trainer passes
# num_items_in_batch to every forward); anything else not in the signature raises.
_IGNORED_KWARGS = frozenset(
    {
        "cache_position",
        "use_cache",
        "past_key_values",
        "past_key_value",
        "layer_idx",
        "position_embeddings",
        "return_dict",
        "output_hidden_states",
        "logits_to_keep",
        "num_items_in_batch",
        "output_router_logits",
    }
)


def _documents_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens of the documents packed into one row (positions restart), or None for one plain sequence."""
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    if not bool(starts[1:].any()):
        return None
    bounds = torch.cat([starts.nonzero().flatten(), pos.new_tensor([pos.numel()])])
    return bounds.to(torch.int32)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function protocol: q/k/v ``(batch, heads, seqlen, head_dim)`` in, the output
    ``(batch, seqlen_q, heads, head_dim)`` and no attention weights out."""
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        raise TypeError(
            f"attn_implementation={NAME!r} got keyword arguments it does not implement: {unknown}"
        )
    if s_aux is not None:
        raise NotImplementedError(f"attn_implementation={NAME!r} does not implement attention sinks (s_aux)")
    if output_attentions:
        raise NotImplementedError(
            f"attn_implementation={NAME!r} cannot return attention weights "
            "(output_attentions=True); use attn_implementation='eager'"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={NAME!r} takes a 2-D (batch, kv_length) padding mask, got shape "
            f"{tuple(attention_mask.shape)}: register() must have installed its mask function, and "
            "custom 4-D masks are not supported"
        )

    causal = module.is_causal if is_causal is None else is_causal
    opts = dict(
        dropout_p=dropout,  # models pass their attention dropout only while training (0.0 in eval)
        softmax_scale=scaling,
        causal=bool(causal),
        softcap=0.0 if softcap is None else softcap,
        # transformers' sliding window counts the query itself: sliding_window - 1 keys back.
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1),
    )
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seqlen, heads, head_dim)
    v_dim = v.shape[-1]
    if v_dim != q.shape[-1]:  # e.g. MLA: one head dim for the kernel; zero columns of v give zero outputs
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    batch, seqlen_q = q.shape[:2]

    if attention_mask is not None:
        mask = attention_mask.bool()
        if mask.shape[1] > k.shape[1]:
            raise ValueError(f"attention_mask covers {mask.shape[1]} keys but there are {k.shape[1]}")
        k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]  # a static cache's unused tail
        k_p, idx_k, cu_k, max_k, _ = unpad_input(k, mask)
        v_p = index_first_axis(v.flatten(0, 1), idx_k)
        q_p, idx_q, cu_q, max_q, _ = unpad_input(q, mask[:, -seqlen_q:])
        out = flash_attn_varlen_func(q_p, k_p, v_p, cu_q, cu_k, max_q, max_k, **opts)
        out = pad_input(out, idx_q, batch, seqlen_q)
    elif cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if cu_seq_lens_q is None or cu_seq_lens_k is None or max_length_q is None or max_length_k is None:
            raise ValueError("cu_seq_lens_q, cu_seq_lens_k, max_length_q and max_length_k come together")
        out = flash_attn_varlen_func(
            q.flatten(0, 1),
            k.flatten(0, 1),
            v.flatten(0, 1),
            cu_seq_lens_q.int(),
            cu_seq_lens_k.int(),
            int(max_length_q),
            int(max_length_k),
            **opts,
        )
        out = out.view(batch, seqlen_q, *out.shape[1:])
    else:
        cu = None
        if position_ids is not None and batch == 1 and seqlen_q == k.shape[1] and seqlen_q > 1:
            cu = _documents_from_positions(position_ids)
        if cu is None:
            out = flash_attn_func(q, k, v, **opts)
        else:
            longest = int(cu.diff().max())
            out = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, longest, longest, **opts)[None]
    return out[..., :v_dim], None


def register(name: str = NAME) -> None:
    """Registers ``attn_implementation=name`` (default ``"cm3leon"``) with transformers: the attention
    function and, under the same name, transformers' flash-attention mask function (2-D padding masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
