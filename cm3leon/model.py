"""The thin CM3Leon model: a decoder-only transformer whose attention runs on cm3leon_kernels.

Three entry points share the weights:
- ``forward(tokens [B, S])``: full causal sequences (``flash_attn_func``).
- ``forward(tokens [T], cu_seqlens=..., max_seqlen=...)``: packed training batches of documents that do not
  attend to each other (``flash_attn_varlen_func``); positions restart in every document.
- ``step(tokens [B, S], cache)``: prefill and decode against a preallocated :class:`KVCache`
  (``flash_attn_with_kvcache`` appends the new keys/values in place); CFG streams are just rows of the batch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import cm3leon_kernels as ck
from cm3leon_kernels._checks import as_int

from .config import CM3LeonConfig
from .kv_cache import KVCache
from .layers import FeedForward, HeadNorm, Rotary, fuse_linears, make_norm, transpose_linears


@dataclass(frozen=True)
class AttentionBackend:
    """The three attention entry points the model calls, with FlashAttention's signatures."""

    flash_attn_func: Callable
    flash_attn_varlen_func: Callable
    flash_attn_with_kvcache: Callable


KERNELS = AttentionBackend(ck.flash_attn_func, ck.flash_attn_varlen_func, ck.flash_attn_with_kvcache)


class Attention(nn.Module):
    def __init__(self, config: CM3LeonConfig, backend: AttentionBackend = KERNELS) -> None:
        super().__init__()
        self.backend = backend
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = HeadNorm(self.n_heads, self.head_dim) if config.qk_norm else None
        self.k_norm = HeadNorm(self.n_kv_heads, self.head_dim) if config.qk_norm else None
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one matrix after fuse_projections()
        self.qkv_sizes: list[int] = []

    def fuse_projections(self) -> None:
        """Computes q, k and v with one matmul (the state dict keeps the separate names)."""
        if self.qkv_proj is None:
            self.qkv_sizes = fuse_linears(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj")

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None):
        lead = x.shape[:-1]
        if self.qkv_proj is not None:
            # The attention kernels take contiguous q/k/v: copying three slices costs far less than the two
            # matmul launches (and input reads) that fusing saves.
            q, k, v = (t.contiguous() for t in self.qkv_proj(x).split(self.qkv_sizes, dim=-1))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(*lead, self.n_heads, self.head_dim)
        k = k.view(*lead, self.n_kv_heads, self.head_dim)
        v = v.view(*lead, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        # Under autocast the norms and rotary run in float32 while v comes out of a bf16 matmul: the fused
        # kernel takes one dtype, the one the projections produced.
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0,
                cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x, positions, rotary)
        if cache is not None:
            k_cache, v_cache, seqlens = cache
            out = self.backend.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True)
        elif cu_seqlens is not None:
            out = self.backend.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        else:
            out = self.backend.flash_attn_func(q, k, v, causal=True)
        return self.o_proj(out.reshape(*x.shape[:-1], self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: CM3LeonConfig, attention_backend: AttentionBackend = KERNELS) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, attention_backend)
        self.ffn_norm = make_norm(config)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None, **attn_kwargs) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, rotary, **attn_kwargs)
        return x + self.ffn(self.ffn_norm(x))


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Cumulative document lengths must start at 0, never decrease and end at the packed token count."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
    drop = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
    if drop is not None:
        raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{drop}] = {cu[drop]} < {cu[drop - 1]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens[-1] ({cu[-1]}) must equal the number of packed tokens ({total})")


class CM3Leon(nn.Module):
    """Decoder-only transformer over one text + image token vocabulary (CM3Leon or Chameleon layout).

    ``attention_backend`` defaults to the ``cm3leon_kernels`` ops; the benchmarks pass a PyTorch-SDPA
    :class:`AttentionBackend` to measure the same model without our kernels.
    """

    def __init__(self, config: CM3LeonConfig, *, attention_backend: AttentionBackend = KERNELS) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        self.rotary = Rotary(config.head_dim, config.rope_theta) if config.positions == "rope" else None
        self.blocks = nn.ModuleList(Block(config, attention_backend) for _ in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    # ---- initialisation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation: truncated normal (std ``init_std``, cut at ±3 std) for every matrix,
        zero attention/FFN output projections, learned positions with std ``pos_init_std``, unit norms."""
        c = self.config
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=c.init_std, a=-3 * c.init_std, b=3 * c.init_std)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed.weight, std=c.pos_init_std, a=-3 * c.pos_init_std,
                                  b=3 * c.pos_init_std)
        if c.zero_init_output_proj:
            for block in self.blocks:
                nn.init.zeros_(block.attn.o_proj.weight)
                nn.init.zeros_(block.ffn.down.weight)

    # ---- shared trunk --------------------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor, *, values: bool = True) -> None:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 or int32, got {tokens.dtype}")
        if values and tokens.numel() and not torch.compiler.is_compiling():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"tokens must be in [0, {self.config.vocab_size}); got values in [{lo}, {hi}]")

    def _trunk(self, tokens: torch.Tensor, positions: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        for layer, block in enumerate(self.blocks):
            kwargs = attn_kwargs
            if "cache" in attn_kwargs:
                cache: KVCache = attn_kwargs["cache"]
                kwargs = {"cache": (cache.k[layer], cache.v[layer], cache.seqlens)}
            x = block(x, positions, self.rotary, **kwargs)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor, vocab_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Output logits of ``hidden``; only for the ids in ``[lo, hi)`` when ``vocab_range = (lo, hi)`` (e.g.
        the image range while sampling image tokens: the output layer reads only those rows)."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if vocab_range is not None:
            weight = weight[vocab_range[0]: vocab_range[1]]
        return F.linear(hidden, weight)

    # ---- entry points -------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """Next-token logits.

        Args:
            tokens: ``[B, S]`` causal sequences, or ``[T]`` packed documents when ``cu_seqlens`` is given.
            cu_seqlens: int32 ``[n_docs + 1]`` cumulative document lengths (packed mode). Documents do not
                attend to each other and positions restart at 0 in each.
            max_seqlen: longest document in the pack (computed from ``cu_seqlens`` when omitted).

        Returns:
            ``[B, S, vocab]`` or ``[T, vocab]`` logits.
        """
        return self.logits(self.hidden_states(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen))

    def hidden_states(self, tokens: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                      max_seqlen: int | None = None) -> torch.Tensor:
        """The final-norm output that :meth:`logits` projects: ``[B, S, d_model]`` or ``[T, d_model]``
        (arguments as :meth:`forward`)."""
        self._check_tokens(tokens)
        if cu_seqlens is None:
            if tokens.dim() != 2:
                raise ValueError(f"tokens must be [batch, seq] (or [total] with cu_seqlens), got {tuple(tokens.shape)}")
            if tokens.shape[1] > self.config.max_seq_len:
                raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.config.max_seq_len}")
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            return self._trunk(tokens, positions)
        positions, max_seqlen = self._packed_positions(tokens, cu_seqlens, max_seqlen)
        return self._trunk(tokens, positions, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, loss_weights: torch.Tensor, *,
             cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """Weighted next-token cross entropy: ``sum(w * CE) / sum(w)`` over every position (0 when
        ``sum(w) == 0``), reduced in float32 (or the model's float64) whatever the autocast dtype of the logits.

        ``targets[i]`` is the token to predict at position ``i`` (the next token of the same document) and
        ``loss_weights[i]`` its weight; shapes follow ``tokens`` (``[B, S]``, or ``[T]`` packed with
        ``cu_seqlens``/``max_seqlen`` as in :meth:`forward`). The trainer computes every loss through this
        method.

        Where ``cm3leon_kernels.linear_cross_entropy`` has a kernel for the head's device and dtype (CPU;
        float32, bfloat16, float16 weights) the loss is computed by it: the ``[tokens, vocab]`` logits are
        never materialised and the loss and gradients are accumulated in float32 (the head runs in the
        weight's dtype, also under autocast). Elsewhere (other devices, float64 models) it is the plain
        ``F.linear`` + ``F.cross_entropy``; both give the same value up to rounding.
        """
        if targets.shape != tokens.shape or loss_weights.shape != tokens.shape:
            raise ValueError(f"targets {tuple(targets.shape)} and loss_weights {tuple(loss_weights.shape)} must "
                             f"have the shape of tokens {tuple(tokens.shape)}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
        if not loss_weights.dtype.is_floating_point:
            raise TypeError(f"loss_weights must be a floating-point tensor, got {loss_weights.dtype}")
        hidden = self.hidden_states(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if ck.linear_cross_entropy_supports(weight):
            flat = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype).contiguous()
            return ck.linear_cross_entropy(flat, weight, targets.reshape(-1).long(),
                                           loss_weights=loss_weights.reshape(-1), reduction="mean")
        logits = self.logits(hidden)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 reduction under bf16 autocast
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), targets.reshape(-1).long(),
                             reduction="none")
        weights = loss_weights.reshape(-1).to(dtype)
        total = weights.sum()
        # A batch whose weights are all 0 has loss 0 (and zero gradients), not 0/0.
        return (weights * ce).sum() / torch.where(total > 0, total, torch.ones_like(total))

    def _packed_positions(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None):
        if tokens.dim() != 1:
            raise ValueError(f"packed tokens must be 1-D [total_tokens], got {tuple(tokens.shape)}")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [n_docs + 1]")
        if not torch.compiler.is_compiling():  # repeat_interleave below trusts the lengths: check them first
            _check_cu_seqlens(cu_seqlens, tokens.shape[0])
        lengths = cu_seqlens.diff()
        if max_seqlen is None:
            max_seqlen = int(lengths.max())
        if max_seqlen > self.config.max_seq_len:
            raise ValueError(f"a document of {max_seqlen} tokens exceeds max_seq_len {self.config.max_seq_len}")
        starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=tokens.shape[0])
        positions = torch.arange(tokens.shape[0], device=tokens.device, dtype=torch.int32) - starts
        return positions.long(), max_seqlen

    def allocate_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> KVCache:
        """A zeroed KV cache for ``batch`` rows of up to ``max_len`` (default ``max_seq_len``) positions."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        # bools are refused (True was a one-position cache), floats named instead of failing in torch.zeros
        batch, max_len = as_int("batch", batch), as_int("max_len", max_len)
        if batch < 0 or max_len < 1:
            raise ValueError(f"allocate_cache needs batch >= 0 and max_len >= 1, got batch={batch}, "
                             f"max_len={max_len}")
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {self.config.max_seq_len}")
        param = self.embed.weight
        return KVCache.allocate(self.config.n_layers, batch, max_len, self.config.kv_heads, self.config.head_dim,
                                dtype=dtype or param.dtype, device=device or param.device)

    def step(self, tokens: torch.Tensor, cache: KVCache, *, validate: bool = True) -> torch.Tensor:
        """Runs ``tokens [B, S]`` after each row's cached prefix, appends their keys/values to ``cache`` and
        advances ``cache.seqlens`` by ``S``. Returns ``[B, S, vocab]`` logits (prefill: S > 1; decode: S = 1).

        ``validate=False`` skips the checks that read values back to the host (token range, cache room): a
        decode loop that validated its request once and feeds back sampled tokens passes it so that no step
        waits for the device."""
        return self.logits(self.step_hidden(tokens, cache, validate=validate))

    def step_hidden(self, tokens: torch.Tensor, cache: KVCache, *, validate: bool = True) -> torch.Tensor:
        """:meth:`step` without the output layer: the final hidden states ``[B, S, d_model]`` (so a caller can
        compute logits for some positions or ids only, with :meth:`logits`)."""
        self._check_tokens(tokens, values=validate)
        if tokens.dim() != 2 or tokens.shape[0] != cache.batch:
            raise ValueError(f"tokens must be [batch={cache.batch}, S], got {tuple(tokens.shape)}")
        # a cache of another model failed deep inside a layer (IndexError, or a kernel head-count message)
        config = self.config
        layout = (config.n_layers, cache.batch, cache.max_len, config.kv_heads, config.head_dim)
        if tuple(cache.k.shape) != layout or tuple(cache.v.shape) != layout:
            raise ValueError(f"cache k/v must be [n_layers, batch, max_len, n_kv_heads, head_dim] = {layout} "
                             f"for this model, got {tuple(cache.k.shape)} / {tuple(cache.v.shape)}")
        if validate and cache.batch and not torch.compiler.is_compiling():
            filled = int(cache.seqlens.max())
            if filled + tokens.shape[1] > cache.max_len:
                raise ValueError(f"KV cache overflow: {filled} cached + {tokens.shape[1]} new tokens > "
                                 f"cache length {cache.max_len}")
        positions = cache.seqlens[:, None].long() + torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self._trunk(tokens, positions, cache=cache)
        cache.seqlens.add_(tokens.shape[1])
        return hidden

    def fuse_projections(self, *, transpose: bool = False) -> CM3Leon:
        """Fuses every block's q/k/v projections (and the SwiGLU gate/up projections) into one matrix each, for
        inference: fewer, larger matmuls per decode step. ``transpose=True`` also stores every block matrix as
        ``[in, out]`` (:class:`~cm3leon.layers.TransposedLinear`), the layout float32 decoding runs fastest in
        on CPUs (MKL); keep the default for bfloat16.

        Outputs are unchanged; state dicts and checkpoints keep the unfused names and layout
        (``save``/``load_state_dict`` work before and after). It replaces parameter objects, so do it before
        building an optimizer, or not at all for training. Idempotent; returns the model."""
        for block in self.blocks:
            block.attn.fuse_projections()
            block.ffn.fuse_projections()
            if transpose:
                transpose_linears(block.attn)
                transpose_linears(block.ffn)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

