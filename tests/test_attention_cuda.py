"""CUDA attention (forward, packed documents, KV cache) against float64 references; skipped without a GPU.

Mirrors tests/test_attention.py's forward cases on the device: the FlashAttention rule (error <= 2x plain
PyTorch's in the same dtype, on the same GPU), odd lengths, seqlen_q != seqlen_k, GQA/MQA, head dims 8..256
including ones that run padded (80, 160), empty documents, ragged caches, poisoned outputs, bad input,
opcheck.
"""
from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

from attention_checks import (EPS, check_kvcache_case, check_lse, check_non_finite_propagation, cu_seqlens,
                              random_tensor)
from helpers import FLOAT_DTYPES, assert_fa_rule, poisoned_outputs

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ck.cuda_built()),
                                reason="needs a CUDA GPU and a CUDA build of cm3leon_kernels")

DEV = "cuda"
DTYPES = FLOAT_DTYPES
_rand = functools.partial(random_tensor, device=DEV)
_cu = functools.partial(cu_seqlens, device=DEV)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEV)


def _check(out, lse, run_ref, inputs, dtype, name):
    """FA rule for out and lse against the float64 reference; lse is -inf exactly where no key is seen."""
    out64, lse64 = run_ref(*[t.double() for t in inputs])
    outb, lseb = run_ref(*inputs)
    assert out.dtype == dtype and out.device.type == "cuda"
    assert_fa_rule(out, out64, outb, name=f"{name} out", eps=EPS[dtype])
    check_lse(lse, lse64, lseb, name)


def _dense(b, sq, sk, hq, hkv, d, causal, dtype, scale=None, spread=1.0):
    q = _rand(b, sq, hq, d, dtype=dtype, scale=spread)
    k, v = _rand(b, sk, hkv, d, dtype=dtype, scale=spread), _rand(b, sk, hkv, d, dtype=dtype)
    with poisoned_outputs():
        out, lse = ck.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_lse=True)
    _check(out, lse, lambda q, k, v: ref.attention(q, k, v, softmax_scale=scale, causal=causal), (q, k, v),
           dtype, f"{(b, sq, sk, hq, hkv, d, causal)} {dtype}")


# ---- flash_attn_func ---------------------------------------------------------------------------------------

DENSE_CASES = [  # batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal
    (2, 37, 37, 4, 4, 64, True),
    (2, 37, 37, 4, 4, 64, False),
    (1, 300, 300, 2, 2, 128, True),   # several query (128) and key (64) blocks, diagonal blocks
    (1, 257, 190, 2, 1, 128, False),  # ragged last blocks on both sides
    (2, 5, 70, 4, 2, 64, True),       # seqlen_q < seqlen_k: bottom-right aligned
    (1, 150, 21, 3, 1, 96, True),     # seqlen_q > seqlen_k: top rows see no key (MQA)
    (1, 53, 99, 8, 2, 80, False),     # GQA 4:1, odd lengths, head dim padded to 96
    (2, 1, 1, 2, 1, 128, True),       # single token
    (1, 130, 333, 2, 2, 256, True),   # largest head dim, 32-key blocks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attn_func_matches_reference(case, dtype):
    _dense(*case, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("head_dim", [8, 32, 64, 80, 96, 128, 160, 256])
def test_head_dims_and_softmax_scale(head_dim, dtype):
    _dense(1, 29, 141, 2, 1, head_dim, True, dtype, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_rows_without_keys_give_zero(dtype):
    q = _rand(1, 140, 2, 64, dtype=dtype)
    k, v = _rand(1, 4, 2, 64, dtype=dtype), _rand(1, 4, 2, 64, dtype=dtype)
    with poisoned_outputs():
        out, lse = ck.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert (out[:, :136] == 0).all() and (lse[:, :, :136] == float("-inf")).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 136:]).all()
    empty_k = torch.empty(1, 0, 2, 64, device=DEV, dtype=dtype)
    with poisoned_outputs():
        out, lse = ck.flash_attn_func(q, empty_k, empty_k, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_large_scores_are_stable(dtype):
    """Scores in the hundreds: the online softmax must rescale without overflow."""
    _dense(1, 200, 200, 2, 2, 64, True, dtype, spread=6.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("sq", [37, 1], ids=["tiled", "decode"])
@pytest.mark.parametrize("poison", ["nan_key", "inf_key", "nan_query"])
def test_non_finite_inputs_poison_the_rows_that_see_them(sq, poison, dtype):
    check_non_finite_propagation(sq, poison, device=DEV, dtype=dtype)


def test_empty_inputs():
    q = torch.empty(2, 0, 4, 64, device=DEV, dtype=torch.bfloat16)
    out, lse = ck.flash_attn_func(q, q[:, :, :2], q[:, :, :2], return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 0)


def test_non_contiguous_inputs_are_accepted():
    qkv = _rand(2, 70, 3, 4, 64, dtype=torch.bfloat16)  # a fused qkv projection: strided views
    q, k, v = qkv.unbind(2)
    out = ck.flash_attn_func(q, k, v, causal=True)
    out_c = ck.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, out_c)


def test_cuda_matches_cpu_kernel():
    q, k, v = torch.randn(2, 77, 4, 64), torch.randn(2, 90, 2, 64), torch.randn(2, 90, 2, 64)
    out_cpu, lse_cpu = ck.flash_attn_func(q, k, v, causal=True, return_lse=True)
    out, lse = ck.flash_attn_func(q.to(DEV), k.to(DEV), v.to(DEV), causal=True, return_lse=True)
    torch.testing.assert_close(out.cpu(), out_cpu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), lse_cpu, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), sq=st.integers(0, 200), sk=st.integers(0, 200), group=st.sampled_from([1, 2, 3]),
       hkv=st.integers(1, 2), d=st.sampled_from([16, 40, 64, 120]), causal=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_random_shapes_forward(b, sq, sk, group, hkv, d, causal, dtype):
    q = _rand(b, sq, group * hkv, d, dtype=dtype)
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    with poisoned_outputs():
        out, lse = ck.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    if out.numel():
        _check(out, lse, lambda q, k, v: ref.attention(q, k, v, causal=causal), (q, k, v), dtype, "random")


# ---- flash_attn_varlen_func --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_reference(dtype, causal):
    lq, lk = [13, 0, 260, 1, 7, 0, 140], [13, 5, 275, 1, 0, 0, 64]  # empty documents on either side
    hq, hkv, d = 4, 2, 64
    q, k, v = _rand(sum(lq), hq, d, dtype=dtype), _rand(sum(lk), hkv, d, dtype=dtype), _rand(sum(lk), hkv, d,
                                                                                              dtype=dtype)
    cq, ckk = _cu(lq), _cu(lk)
    with poisoned_outputs():
        out, lse = ck.flash_attn_varlen_func(q, k, v, cq, ckk, max(lq), max(lk), causal=causal,
                                             return_lse=True)
    assert lse.shape == (hq, sum(lq))
    _check(out, lse, lambda q, k, v: ref.attention_varlen(q, k, v, cq.cpu(), ckk.cpu(), causal=causal),
           (q, k, v), dtype, "varlen")


def test_varlen_equals_separate_calls():
    lengths = [5, 133, 1, 20]
    q, k, v = (_rand(sum(lengths), 2, 128, dtype=torch.bfloat16) for _ in range(3))
    packed = ck.flash_attn_varlen_func(q, k, v, _cu(lengths), _cu(lengths), 133, 133, causal=True)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        one = ck.flash_attn_func(q[None, s], k[None, s], v[None, s], causal=True)[0]
        torch.testing.assert_close(packed[s], one, atol=0, rtol=0)
        start += n


# ---- flash_attn_with_kvcache -------------------------------------------------------------------------------

KV_CASES = [  # batch, seqlen_q (= new tokens), cache_len, heads_q, heads_kv, head_dim, cache_seqlens
    (3, 1, 64, 4, 2, 64, [0, 17, 63]),            # ragged decode, an empty row
    (2, 1, 4200, 2, 1, 64, [4100, 1500]),         # long cache: the key range is split across blocks
    (8, 1, 4096, 16, 16, 128, [4095] * 8),        # the benchmark shape (MHA decode, one row per block)
    (2, 4, 40, 4, 4, 32, [3, 30]),                # several new tokens (causal among them)
    (2, 1, 300, 8, 1, 128, [290, 7]),             # GQA group of 8 in one block
    (2, 2, 300, 16, 2, 256, [100, 200]),          # 16 rows per kv head: tiled path with a short q
    (1, 200, 250, 2, 1, 128, [10]),               # prefill into a cache: tiled path
    (2, 1, 16, 8, 1, 80, 5),                      # int cache_seqlens, MQA, padded head dim
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_kvcache_matches_reference(case, dtype):
    check_kvcache_case(case, dtype, DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_kvcache_lse_matches_forward(dtype):
    """The decode path's lse (split and merged) equals the tiled forward's on the same keys."""
    q, kc, vc = _rand(2, 1, 4, 256, dtype=dtype), _rand(2, 3000, 2, 256, dtype=dtype), _rand(2, 3000, 2, 256,
                                                                                              dtype=dtype)
    with poisoned_outputs():
        out, lse = torch.ops.cm3leon.flash_attn_kvcache(q, kc, vc, None, None, None, 3000, 0.1, True)
    out_f, lse_f = ck.flash_attn_func(q, kc, vc, softmax_scale=0.1, causal=True, return_lse=True)
    torch.testing.assert_close(lse, lse_f, atol=1e-4, rtol=1e-4)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), out_f.float(), atol=tol, rtol=tol)


def test_decode_loop_matches_full_attention():
    """Token-by-token decode through the cache reproduces causal attention over the whole sequence."""
    s, h, d = 40, 4, 64
    q, k, v = (_rand(1, s, h, d, dtype=torch.float32) for _ in range(3))
    kc, vc = torch.zeros(1, 48, h, d, device=DEV), torch.zeros(1, 48, h, d, device=DEV)
    steps = [ck.flash_attn_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1], v[:, t:t + 1],
                                        cache_seqlens=_i32([t])) for t in range(s)]
    torch.testing.assert_close(torch.cat(steps, 1), ck.flash_attn_func(q, k, v, causal=True), atol=1e-5,
                               rtol=1e-5)


def test_decode_step_captures_in_a_cuda_graph():
    """No host sync in the decode op: one step captures in a CUDA graph and replays with new lengths."""
    b, h, d, cache_len = 2, 4, 128, 512
    q, kn, vn = (_rand(b, 1, h, d, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = _rand(b, cache_len, h, d, dtype=torch.bfloat16), _rand(b, cache_len, h, d, dtype=torch.bfloat16)
    lens = _i32([10, 300])
    ck.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, cache_seqlens=lens)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ck.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens)
    lens.copy_(_i32([50, 400]))
    graph.replay()
    kc2, vc2 = kc.clone(), vc.clone()
    expected = ck.flash_attn_with_kvcache(q, kc2, vc2, kn, vn, cache_seqlens=lens)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_misaligned_inputs_are_copied():
    """Inputs that start off a 16-byte boundary are copied once (as in the backward), not refused."""
    q, k, v = (_rand(1, 8, 2, 32, dtype=torch.bfloat16) for _ in range(3))
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEV)
    q_misaligned = buf[1:].view(q.shape)
    q_misaligned.copy_(q)
    torch.testing.assert_close(ck.flash_attn_func(q_misaligned, k, v), ck.flash_attn_func(q, k, v), atol=0, rtol=0)


# ---- bad input ---------------------------------------------------------------------------------------------

def _bad_calls():
    q, k, v = (_rand(1, 8, 2, 32, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = torch.zeros(2, 10, 2, 32, device=DEV), torch.zeros(2, 10, 2, 32, device=DEV)
    qd, kn = _rand(2, 1, 4, 32, dtype=torch.float32), _rand(2, 1, 2, 32, dtype=torch.float32)
    cu = _i32([0, 3, 8])
    return {
        "mixed devices": (lambda: ck.flash_attn_func(q, k.cpu(), v.cpu()), ValueError, "k is on cpu"),
        "cu on cpu": (lambda: ck.flash_attn_varlen_func(q[0], k[0], v[0], cu.cpu(), cu, 5, 5), ValueError,
                      "cu_seqlens_q is on cpu"),
        "cu dtype": (lambda: ck.flash_attn_varlen_func(q[0], k[0], v[0], cu.long(), cu, 5, 5), TypeError,
                     "cu_seqlens_q must be int32"),
        "head dim": (lambda: ck.flash_attn_func(q[..., :12].contiguous(), k[..., :12].contiguous(),
                                                v[..., :12].contiguous()), NotImplementedError, "head dim"),
        "cache overflow (int)": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, kn, kn.clone(), cache_seqlens=10),
                                 ValueError, "overflows the cache"),
        "seqlens on cpu": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, kn, kn.clone(),
                                                              cache_seqlens=torch.tensor([3, 4], dtype=torch.int32)),
                           ValueError, "cache_seqlens is on cpu"),
        "seqlens dtype": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, kn, kn.clone(),
                                                            cache_seqlens=_i32([3, 4]).long()),
                          TypeError, "int32"),
        "cache dtype": (lambda: ck.flash_attn_with_kvcache(qd, kc.half(), vc.half(), cache_seqlens=2),
                        TypeError, "share a dtype"),
    }


@pytest.mark.parametrize("name", ["mixed devices", "cu on cpu", "cu dtype", "head dim",
                                  "cache overflow (int)", "seqlens on cpu", "seqlens dtype", "cache dtype"])
def test_bad_input_raises_clear_error(name):
    call, exc, message = _bad_calls()[name]
    with pytest.raises(exc, match=re.escape(message)):
        call()


def test_bad_device_values_never_write_out_of_bounds():
    """Device-side lengths are not read back (no sync): overflowing cache_seqlens are clamped, not reported.
    The memory right after the cache (a guard region of the same allocation) must stay untouched."""
    big = torch.zeros(2 * 10 * 2 * 32 + 4 * 2 * 32, device=DEV)
    kc, vc = big[: 2 * 10 * 2 * 32].view(2, 10, 2, 32), torch.zeros(2, 10, 2, 32, device=DEV)
    qd, kn = _rand(2, 1, 4, 32, dtype=torch.float32), _rand(2, 3, 2, 32, dtype=torch.float32)
    out = ck.flash_attn_with_kvcache(qd, kc, vc, kn, kn.clone(), cache_seqlens=_i32([9, 100]))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert (big[2 * 10 * 2 * 32:] == 0).all(), "append wrote past the cache"
    assert torch.equal(kc[0, 9], kn[0, 0]), "in-range positions are still written"


def test_opcheck_forward_ops():
    """torch.library consistency of the CUDA implementations (autograd excluded: the CUDA backward is
    registered separately)."""
    ops = torch.ops.cm3leon
    q, k, v = (_rand(2, 9, 2, 32, dtype=torch.bfloat16) for _ in range(3))
    torch.library.opcheck(ops.flash_attn_forward, (q, k, v, 0.3, True))
    cu = _i32([0, 3, 3, 9])
    torch.library.opcheck(ops.flash_attn_varlen_forward, (q[0].repeat(1, 1, 1), k[0], v[0], cu, cu, 6, 6, 0.3,
                                                          True))
    kc, vc = _rand(2, 12, 2, 32, dtype=torch.bfloat16), _rand(2, 12, 2, 32, dtype=torch.bfloat16)
    qd, kn, vn = (_rand(2, 1, h, 32, dtype=torch.bfloat16) for h in (4, 2, 2))
    torch.library.opcheck(ops.flash_attn_kvcache, (qd, kc, vc, kn, vn, _i32([3, 11]), 0, 0.2, True))
