"""cm3leon_kernels.flash_attn_interface: FlashAttention 2.8's signatures and argument handling (the kernels'
features themselves are tested in test_attention_features.py / test_kvcache_features.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

from helpers import poisoned_outputs

_COMMON = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
_REQ = inspect.Parameter.empty
# flash-attn 2.8's positional parameters and defaults, in order (our keyword-only return_lse comes after).
FA_SIGNATURES = {
    "flash_attn_func": [("q", _REQ), ("k", _REQ), ("v", _REQ), *_COMMON],
    "flash_attn_qkvpacked_func": [("qkv", _REQ), *_COMMON],
    "flash_attn_kvpacked_func": [("q", _REQ), ("kv", _REQ), *_COMMON],
    "flash_attn_varlen_func": [
        ("q", _REQ),
        ("k", _REQ),
        ("v", _REQ),
        ("cu_seqlens_q", _REQ),
        ("cu_seqlens_k", _REQ),
        ("max_seqlen_q", _REQ),
        ("max_seqlen_k", _REQ),
        *_COMMON,
        ("block_table", None),
    ],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _REQ), ("cu_seqlens", _REQ), ("max_seqlen", _REQ), *_COMMON],
    "flash_attn_varlen_kvpacked_func": [
        ("q", _REQ),
        ("kv", _REQ),
        ("cu_seqlens_q", _REQ),
        ("cu_seqlens_k", _REQ),
        ("max_seqlen_q", _REQ),
        ("max_seqlen_k", _REQ),
        *_COMMON,
    ],
    "flash_attn_with_kvcache": [
        ("q", _REQ),
        ("k_cache", _REQ),
        ("v_cache", _REQ),
        ("k", None),
        ("v", None),
        ("rotary_cos", None),
        ("rotary_sin", None),
        ("cache_seqlens", None),
        ("cache_batch_idx", None),
        ("cache_leftpad", None),
        ("block_table", None),
        ("softmax_scale", None),
        ("causal", False),
        ("window_size", (-1, -1)),
        ("softcap", 0.0),
        ("rotary_interleaved", True),
        ("alibi_slopes", None),
        ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
}


@pytest.mark.parametrize("name", FA_SIGNATURES)
def test_signatures_are_flash_attn_28s(name):
    params = list(inspect.signature(getattr(ck, name)).parameters.values())
    positional = [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == FA_SIGNATURES[name]
    assert all(p.name == "return_lse" and p.default is False for p in params if p.kind == p.KEYWORD_ONLY)
    assert getattr(ck.flash_attn_interface, name) is getattr(ck, name)


def _qkv(b=2, sq=9, sk=11, hq=4, hkv=2, d=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, sq, hq, d, generator=g).to(dtype),
        torch.randn(b, sk, hkv, d, generator=g).to(dtype),
        torch.randn(b, sk, hkv, d, generator=g).to(dtype),
    )


def test_return_forms():
    q, k, v = _qkv()
    out = ck.flash_attn_func(q, k, v)
    out3, lse3, s_dmask = ck.flash_attn_func(q, k, v, return_attn_probs=True)
    out2, lse2 = ck.flash_attn_func(q, k, v, return_lse=True)
    assert s_dmask is None and lse3.shape == (2, 4, 9) and lse3.dtype == torch.float32
    assert torch.equal(out, out3) and torch.equal(out, out2) and torch.equal(lse2, lse3)
    with pytest.raises(ValueError, match="return_lse"):
        ck.flash_attn_func(q, k, v, return_attn_probs=True, return_lse=True)


def test_window_size_positional_and_normalised_as_flash_attn():
    q, k, v = _qkv(sq=13, sk=5)  # seqlen_q > seqlen_k: a right window >= seqlen_k is unbounded, as in FA
    with poisoned_outputs():
        got = ck.flash_attn_func(q, k, v, 0.0, None, False, (2, 7))
    want, _ = ref.attention(q.double(), k.double(), v.double(), window_size=(2, -1))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # causal sets the right side to 0; a tensor window (FA's tests pass torch.randint) works too
    a = ck.flash_attn_func(q, k, v, causal=True, window_size=torch.tensor([3, 4]))
    b = ck.flash_attn_func(q, k, v, window_size=(3, 0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(TypeError, match="window_size"):
        ck.flash_attn_func(q, k, v, 0.0, None, False, True)  # the old 7th positional (return_lse)
    with pytest.raises(TypeError, match=r"window_size\[1\]"):
        ck.flash_attn_func(q, k, v, window_size=(1, 2.5))


def test_packed_variants_match_unpacked_and_give_packed_gradients():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 10, 3, 4, 16, generator=g, requires_grad=True)
    out = ck.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(3, 0), softcap=2.0)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    want = ck.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), softcap=2.0)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], 2), atol=0, rtol=0)

    kv = torch.randn(2, 12, 2, 2, 16, generator=g, requires_grad=True)
    qq = torch.randn(2, 10, 4, 16, generator=g)
    ck.flash_attn_kvpacked_func(qq, kv, causal=True).sum().backward()
    assert kv.grad is not None and kv.grad.abs().sum() > 0

    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    vqkv = torch.randn(10, 3, 4, 16, generator=g, requires_grad=True)
    out = ck.flash_attn_varlen_qkvpacked_func(vqkv, cu, 6, causal=True)
    sep = [ck.flash_attn_qkvpacked_func(vqkv[None, s:e], causal=True)[0] for s, e in ((0, 4), (4, 10))]
    torch.testing.assert_close(out, torch.cat(sep), atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert vqkv.grad.shape == vqkv.shape
    vkv = torch.randn(10, 2, 2, 16, generator=g, requires_grad=True)
    ck.flash_attn_varlen_kvpacked_func(vqkv.detach()[:, 0], vkv, cu, cu, 6, 6).sum().backward()
    assert vkv.grad is not None


def test_varlen_block_table_gathers_pages():
    g = torch.Generator().manual_seed(4)
    page, blocks = 4, 7
    kc, vc = (torch.randn(blocks, page, 2, 16, generator=g) for _ in range(2))
    table = torch.tensor([[3, 1, 6], [5, 0, 2]], dtype=torch.int32)
    lens_k = [9, 12]
    cu_k = torch.tensor([0, 9, 21], dtype=torch.int32)
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    q = torch.randn(8, 4, 16, generator=g)
    got = ck.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 5, 12, causal=True, block_table=table)
    k = torch.cat([kc[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(lens_k)])
    v = torch.cat([vc[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(lens_k)])
    torch.testing.assert_close(
        got, ck.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 12, causal=True), atol=0, rtol=0
    )
    with pytest.raises(ValueError, match="block_table"):
        ck.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 5, 12, block_table=table[:, :2])
    with pytest.raises(TypeError, match="block_table"):
        ck.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 5, 12, block_table=table.long())
    # v is gathered with k's page size: a v of another paged layout must not be silently misread
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ck.flash_attn_varlen_func(q, kc, vc.view(blocks * 2, page // 2, 2, 16), cu_q, cu_k, 5, 12,
                                  block_table=table)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        ck.flash_attn_varlen_func(q, kc, vc.tolist(), cu_q, cu_k, 5, 12, block_table=table)


def test_kvcache_defaults_and_positional_order_are_flash_attn_28s():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 2, 16, generator=g)
    kc, vc = torch.randn(1, 8, 2, 16, generator=g), torch.randn(1, 8, 2, 16, generator=g)
    # causal defaults to False (FlashAttention's default): all 4 queries see all 8 keys
    torch.testing.assert_close(
        ck.flash_attn_with_kvcache(q, kc, vc), ck.flash_attn_func(q, kc, vc), atol=1e-6, rtol=1e-6
    )
    with pytest.raises(TypeError, match="rotary_cos"):
        ck.flash_attn_with_kvcache(
            q, kc, vc, None, None, 3
        )  # 6th positional is rotary_cos, not cache_seqlens
    with pytest.raises(ValueError, match="one device"):
        ck.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, alibi_slopes=torch.ones(2, device="meta"))


def test_kvcache_takes_strided_new_kv_and_block_table_as_flash_attn():
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 3, 3, 2, 16, generator=g)  # a fused projection: q, k, v are strided views
    q, k, v = qkv.unbind(2)
    kc, vc = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
    seqlens = torch.tensor([1, 4], dtype=torch.int32)
    got = ck.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, causal=True)
    kd, vd = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
    want = ck.flash_attn_with_kvcache(q.contiguous(), kd, vd, k.contiguous(), v.contiguous(),
                                      cache_seqlens=seqlens, causal=True)
    assert torch.equal(got, want) and torch.equal(kc, kd) and torch.equal(vc, vd)
    # a column slice of a wider block table (FlashAttention needs only a dense last dimension)
    kp, vp = torch.randn(6, 4, 2, 16, generator=g), torch.randn(6, 4, 2, 16, generator=g)
    wide = torch.tensor([[4, 1, 0, 0], [2, 5, 0, 0]], dtype=torch.int32)
    got = ck.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens + 3, block_table=wide[:, :2])
    want = ck.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens + 3,
                                      block_table=wide[:, :2].contiguous())
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "shapes",
    [((2, 1, 2, 16), (10,), None), ((2, 1, 2, 16), (2, 10, 2, 16), (2,)), ((), (2, 10, 2, 16), None)],
    ids=["1-D cache", "1-D block_table", "0-D q"],
)
def test_kvcache_wrong_rank_names_the_argument(shapes):
    # The wrapper reads the cache's capacity and q's head dim before the launcher's checks: a tensor of the
    # wrong rank must raise ValueError naming it, not IndexError from a shape lookup.
    q_shape, cache_shape, table_shape = shapes
    cache = torch.zeros(cache_shape)
    table = None if table_shape is None else torch.zeros(table_shape, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table" if table is not None else "4-D"):
        ck.flash_attn_with_kvcache(torch.zeros(q_shape), cache, cache, cache_seqlens=1, block_table=table)


_CU = (torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 11], dtype=torch.int32), 9, 11)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda q, k, v: ck.flash_attn_func(q, k, v, dropout_p=-0.1), ValueError, "dropout_p"),
        (lambda q, k, v: ck.flash_attn_func(q, k, v, softcap=float("inf")), ValueError, "softcap"),
        (lambda q, k, v: ck.flash_attn_func(q, k, v, softcap="1"), TypeError, "softcap"),
        (lambda q, k, v: ck.flash_attn_qkvpacked_func(q), ValueError, "qkv must be"),
        (lambda q, k, v: ck.flash_attn_kvpacked_func(q, k), ValueError, "kv must be"),
        (lambda q, k, v: ck.flash_attn_kvpacked_func(q, torch.stack([k, v], 2).half()), TypeError, "kv"),
        (lambda q, k, v: ck.flash_attn_func(q, k, v, alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes"),
        (lambda q, k, v: ck.flash_attn_varlen_func(q[0], k[0], v[0], *_CU, alibi_slopes=0.5), TypeError,
         "alibi_slopes"),
    ],
)
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_qkv())


def test_softcap_at_or_below_zero_means_none():
    q, k, v = _qkv()
    plain = ck.flash_attn_func(q, k, v)
    torch.testing.assert_close(ck.flash_attn_func(q, k, v, softcap=-1.0), plain, atol=0, rtol=0)
