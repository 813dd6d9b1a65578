"""Paged KV-cache decode: cm3leon's decode reading pages through a shuffled block table ("cm3leon"), the same
decode on a contiguous cache ("cm3leon contiguous"), and torch's scaled_dot_product_attention with an explicit
key mask over a padded contiguous cache ("torch.sdpa+mask", its native (B, H, S, D) layout).

Case: one decode step (q of one token per row, no append) for B=8 rows of different lengths (continuous
batching: 1024..4096 cached tokens), H=16 heads of D=64, page sizes 16 and 256, fp32 and bf16. Work is the
K/V bytes the rows' valid tokens occupy (GB/s). Target: paged within 10% of contiguous (ratio >= 0.9).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cm3leon_kernels._native import ops

B, H, D, MAX_LEN = 8, 16, 64, 4096


def _inputs(dtype, page):
    g = torch.Generator().manual_seed(0)
    seqlens = torch.randint(1024, MAX_LEN + 1, (B,), generator=g, dtype=torch.int32)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype)
    k, v = [torch.randn(B, MAX_LEN, H, D, generator=g).to(dtype) for _ in range(2)]
    # The same tokens in pages: row b's position p in block table[b, p // page], blocks shuffled over the pool.
    per_row = MAX_LEN // page
    table = torch.randperm(B * per_row, generator=g).view(B, per_row).to(torch.int32)
    k_paged, v_paged = [torch.empty(B * per_row, page, H, D, dtype=dtype) for _ in range(2)]
    k_paged[table.long()] = k.view(B, per_row, page, H, D)
    v_paged[table.long()] = v.view(B, per_row, page, H, D)
    return q, k, v, seqlens, k_paged, v_paged, table


@pytest.mark.parametrize("page", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["cm3leon", "cm3leon contiguous", "torch.sdpa+mask"])
def test_paged_decode(benchmark, bench_record, impl, dtype, page):
    q, k, v, seqlens, k_paged, v_paged, table = _inputs(dtype, page)
    scale = D ** -0.5
    if impl == "cm3leon":
        fn = lambda: ops.flash_attn_kvcache(q, k_paged, v_paged, None, None, seqlens, 0, scale, True,  # noqa: E731
                                            block_table=table)
    elif impl == "cm3leon contiguous":
        fn = lambda: ops.flash_attn_kvcache(q, k, v, None, None, seqlens, 0, scale, True)  # noqa: E731
    else:
        qs, ks, vs = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
        mask = (torch.arange(MAX_LEN)[None] < seqlens[:, None].long())[:, None, None]  # (B, 1, 1, S)
        fn = lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)  # noqa: E731
    name = str(dtype).split(".")[1]
    valid_bytes = int(seqlens.sum()) * H * D * k.element_size() * 2
    bench_record(benchmark, case=f"kvcache paged decode {name} B={B} H={H} D={D} len<={MAX_LEN} page={page}",
                 impl=impl, work=valid_bytes, unit="GB/s")
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)
