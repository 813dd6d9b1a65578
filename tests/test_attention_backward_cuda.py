"""CUDA attention backward (flash_attn_backward / flash_attn_varlen_backward on the GPU) against float64
autograd of the reference, with the FlashAttention tolerance rule.

The ops are called directly with ``out``/``lse`` of the float64 reference, so these tests do not depend on
the CUDA forward; ``test_public_api_backward`` runs the whole differentiable path once the forward is on the
GPU too.
Skipped without a GPU and a CUDA build.
"""
from __future__ import annotations

import functools

import pytest
import torch

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

from attention_checks import GRAD_EPS, cu_seqlens, leaves, random_tensor
from helpers import assert_fa_rule, fa_rule_bound, poisoned_outputs

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ck.cuda_built()),
                                reason="needs a GPU and a CUDA build of cm3leon_kernels")

ops = torch.ops.cm3leon
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_rand = functools.partial(random_tensor, device="cuda")
_cu = functools.partial(cu_seqlens, device="cuda")


def _reference_grads(run_ref, inputs, dout):
    """Reference gradients of q, k, v for `dout`: (out, lse, grads) in float64 and grads in the inputs' dtype
    (plain PyTorch, the FA rule's baseline)."""
    x64 = leaves(*[t.double() for t in inputs])
    out64, lse64 = run_ref(*x64)
    out64.backward(dout.double())
    xb = leaves(*inputs)
    outb, _ = run_ref(*xb)
    outb.backward(dout)
    return out64, lse64, [t.grad for t in x64], [t.grad for t in xb]


def _check_grads(grads, grads64, grads_b, dtype, name):
    for label, g, g64, gb in zip("qkv", grads, grads64, grads_b):
        assert g.dtype == dtype and g.device.type == "cuda", f"{name} d{label}: {g.dtype} on {g.device}"
        assert_fa_rule(g, g64, gb, name=f"{name} d{label}", eps=GRAD_EPS[dtype])


def _dense_backward(q, k, v, dout, scale, causal):
    """Runs the CUDA backward op on the reference's forward: (grads, float64 grads, baseline grads)."""
    out64, lse64, g64, gb = _reference_grads(lambda q, k, v: ref.attention(q, k, v, scale, causal), (q, k, v),
                                             dout)
    with poisoned_outputs():
        grads = ops.flash_attn_backward(dout, q, k, v, out64.to(q.dtype), lse64.float(), scale, causal)
    return grads, g64, gb


DENSE_CASES = [  # batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal
    (2, 37, 37, 4, 4, 64, True),
    (2, 37, 37, 4, 4, 64, False),
    (1, 130, 130, 2, 2, 32, True),     # several query and key blocks, head dim 32 in the 64 bucket
    (2, 5, 70, 4, 2, 64, True),        # seqlen_q < seqlen_k: bottom-right aligned
    (1, 70, 21, 3, 1, 96, True),       # seqlen_q > seqlen_k: top rows see no key (MQA); 96 in the 128 bucket
    (1, 53, 99, 8, 2, 80, False),      # GQA 4:1, head dim 80 in the 128 bucket
    (2, 1, 1, 2, 1, 128, True),        # single token
    (1, 200, 333, 6, 2, 128, True),    # GQA 3:1 over several blocks, odd lengths
    (1, 129, 65, 2, 2, 160, False),    # head dim 160 in the 256 bucket
    (1, 96, 96, 2, 1, 256, True),
    (1, 45, 77, 2, 2, 8, True),        # head dim 8 in the 64 bucket
    (2, 300, 300, 4, 1, 40, True),     # MQA, head dim 40 in the 64 bucket
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_backward_matches_float64_autograd(case, dtype):
    b, sq, sk, hq, hkv, d, causal = case
    q = _rand(b, sq, hq, d, dtype=dtype)
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    dout = _rand(b, sq, hq, d, dtype=dtype)
    grads, g64, gb = _dense_backward(q, k, v, dout, d ** -0.5, causal)
    _check_grads(grads, g64, gb, dtype, str(case))


@pytest.mark.parametrize("dtype, magnitude",
                         [(torch.bfloat16, 3.0), (torch.float16, 3.0), (torch.float32, 1.0)],
                         ids=["bf16", "fp16", "fp32"])
def test_softmax_scale_and_large_values(dtype, magnitude):
    """A non-default scale; in 16 bits also q, k of magnitude ~3 (peaked softmax rows). (Not in fp32:
    recomputing P from a saved lse of magnitude L has a relative error of about L * 2^-24, as in
    FlashAttention, which the fp32 rule's floor does not cover for large L.)"""
    q, k, v = _rand(1, 66, 4, 64, dtype=dtype, scale=magnitude), \
        _rand(1, 66, 2, 64, dtype=dtype, scale=magnitude), _rand(1, 66, 2, 64, dtype=dtype)
    grads, g64, gb = _dense_backward(q, k, v, _rand(1, 66, 4, 64, dtype=dtype), 0.3, True)
    _check_grads(grads, g64, gb, dtype, "scale 0.3")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_rows_without_keys_get_zero_dq(dtype):
    q = _rand(1, 70, 2, 64, dtype=dtype)
    k, v = _rand(1, 21, 2, 64, dtype=dtype), _rand(1, 21, 2, 64, dtype=dtype)
    (dq, dk, dv), _, _ = _dense_backward(q, k, v, _rand(1, 70, 2, 64, dtype=dtype), 0.125, True)
    assert (dq[:, :49] == 0).all(), "queries that see no key must get dq = 0"
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_dk_dv_are_deterministic():
    """dK/dV are summed in registers (GQA included), without atomics: two runs agree bit for bit."""
    q, k, v = _rand(2, 150, 8, 128, dtype=torch.bfloat16), _rand(2, 150, 2, 128, dtype=torch.bfloat16), \
        _rand(2, 150, 2, 128, dtype=torch.bfloat16)
    out, lse = ref.attention(q.double(), k.double(), v.double(), causal=True)
    dout = torch.randn_like(q)
    args = (dout, q, k, v, out.to(q.dtype), lse.float(), 0.1, True)
    first, second = ops.flash_attn_backward(*args), ops.flash_attn_backward(*args)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    torch.testing.assert_close(first[0], second[0], atol=1e-3, rtol=1e-2)  # dq: fp32 atomics, order varies


def _misaligned(t):
    """The same values in a contiguous view whose data starts 2 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def test_misaligned_inputs_are_accepted():
    q, k, v = _rand(1, 77, 4, 64, dtype=torch.bfloat16), _rand(1, 77, 2, 64, dtype=torch.bfloat16), \
        _rand(1, 77, 2, 64, dtype=torch.bfloat16)
    out, lse = ref.attention(q.double(), k.double(), v.double(), causal=True)
    dout, out = torch.randn_like(q), out.to(q.dtype)
    want = ops.flash_attn_backward(dout, q, k, v, out, lse.float(), 0.125, True)
    got = ops.flash_attn_backward(*map(_misaligned, (dout, q, k, v, out)), lse.float(), 0.125, True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_backward_matches_float64_autograd(dtype, causal):
    lq, lk = [13, 0, 60, 1, 7, 0, 130], [13, 5, 75, 1, 0, 0, 129]  # empty documents on either side
    hq, hkv, d = 4, 2, 64
    q, k, v = _rand(sum(lq), hq, d, dtype=dtype), _rand(sum(lk), hkv, d, dtype=dtype), \
        _rand(sum(lk), hkv, d, dtype=dtype)
    dout = _rand(sum(lq), hq, d, dtype=dtype)
    cq, ckk = _cu(lq), _cu(lk)
    out64, lse64, g64, gb = _reference_grads(
        lambda q, k, v: ref.attention_varlen(q, k, v, cq, ckk, causal=causal), (q, k, v), dout)
    with poisoned_outputs():
        grads = ops.flash_attn_varlen_backward(dout, q, k, v, out64.to(dtype), lse64.float(), cq, ckk,
                                               max(lq), max(lk), d ** -0.5, causal)
    _check_grads(grads, g64, gb, dtype, f"varlen causal={causal}")
    assert (grads[1][13:18] == 0).all(), "keys of a document without queries must get dk = 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("max_seqlen", [(20, 17), (1, 1), (0, 0)], ids=lambda m: f"max{m[0]}-{m[1]}")
def test_varlen_backward_documents_longer_than_max_seqlen(dtype, max_seqlen):
    """On CUDA max_seqlen_q/k only size the grid (cu_seqlens are not read back to check them): a document with
    more keys than max_seqlen_k still gets dK/dV for every key (blocks stride over its key blocks). dK/dV equal
    the run with the true maxima bit for bit (same tiles, no atomics) and all gradients match the CPU's."""
    lq, lk = [13, 0, 150, 1, 70], [40, 5, 201, 1, 0]
    hq, hkv, d, scale = 4, 2, 64, 0.125
    q, k, v = _rand(sum(lq), hq, d, dtype=dtype), _rand(sum(lk), hkv, d, dtype=dtype), \
        _rand(sum(lk), hkv, d, dtype=dtype)
    dout = _rand(sum(lq), hq, d, dtype=dtype)
    cq, ckk = _cu(lq), _cu(lk)
    out64, lse64, g64, gb = _reference_grads(
        lambda q, k, v: ref.attention_varlen(q, k, v, cq, ckk, scale, causal=True), (q, k, v), dout)
    args = (dout, q, k, v, out64.to(dtype), lse64.float(), cq, ckk)
    with poisoned_outputs():
        grads = ops.flash_attn_varlen_backward(*args, *max_seqlen, scale, True)
    _check_grads(grads, g64, gb, dtype, f"varlen max_seqlen={max_seqlen}")
    exact = ops.flash_attn_varlen_backward(*args, max(lq), max(lk), scale, True)
    assert torch.equal(grads[1], exact[1]) and torch.equal(grads[2], exact[2])
    cpu = ops.flash_attn_varlen_backward(*(t.cpu() for t in args), max(lq), max(lk), scale, True)
    for label, g, c, g64_, gb_ in zip("qkv", grads, cpu, g64, gb):
        # Both within the FlashAttention rule of the float64 gradients, so within twice its bound of each other.
        err = (g.cpu().double() - c.double()).abs().max().item()
        assert err <= 2 * fa_rule_bound(g64_, gb_, eps=GRAD_EPS[dtype]), f"d{label}: {err:.3e} from the CPU's"


def test_public_api_backward():
    """flash_attn_func / flash_attn_varlen_func + .backward() on the GPU (needs the CUDA forward as well)."""
    try:
        ck.flash_attn_func(*(torch.zeros(1, 1, 1, 8, device="cuda") for _ in range(3)))
    except NotImplementedError:
        pytest.skip("the attention forward has no CUDA kernel in this build")
    dtype = torch.bfloat16
    q = _rand(2, 91, 6, 64, dtype=dtype)
    k, v = _rand(2, 91, 2, 64, dtype=dtype), _rand(2, 91, 2, 64, dtype=dtype)
    dout = _rand(2, 91, 6, 64, dtype=dtype)
    x = leaves(q, k, v)
    ck.flash_attn_func(*x, causal=True).backward(dout)
    _, _, g64, gb = _reference_grads(lambda q, k, v: ref.attention(q, k, v, causal=True), (q, k, v), dout)
    _check_grads([t.grad for t in x], g64, gb, dtype, "flash_attn_func")

    lengths = [40, 0, 51]
    cu = _cu(lengths)
    qp, kp, vp, dp = q[0, :91], k[0, :91], v[0, :91], dout[0, :91]
    _, _, g64, gb = _reference_grads(lambda q, k, v: ref.attention_varlen(q, k, v, cu, cu, causal=True),
                                     (qp, kp, vp), dp)
    for max_seqlen in (51, 7):  # 7: shorter than the documents, which CUDA does not check (grid size only)
        x = leaves(qp, kp, vp)
        ck.flash_attn_varlen_func(*x, cu, cu, max_seqlen, max_seqlen, causal=True).backward(dp)
        _check_grads([t.grad for t in x], g64, gb, dtype, f"flash_attn_varlen_func max_seqlen={max_seqlen}")


def _op_inputs(sk=47, dtype=torch.bfloat16):
    """Arguments of flash_attn_backward with a consistent forward (out, lse of the float64 reference)."""
    q = _rand(1, 33, 4, 32, dtype=dtype)
    k, v = _rand(1, sk, 2, 32, dtype=dtype), _rand(1, sk, 2, 32, dtype=dtype)
    out, lse = ref.attention(q.double(), k.double(), v.double(), causal=True)
    return torch.randn_like(q), q, k, v, out.to(dtype), lse.float()


def test_opcheck_backward_ops():
    args = _op_inputs()
    torch.library.opcheck(ops.flash_attn_backward.default, (*args, 0.2, True))
    cu = _cu([33])
    dout, q, k, v, out, lse = (t[0] for t in _op_inputs(sk=33))  # one packed document
    torch.library.opcheck(ops.flash_attn_varlen_backward.default,
                          (dout, q, k, v, out, lse, cu, cu, 33, 33, 0.2, True))


def _bad_call(name):
    """(expected exception, call) of one kind of bad input."""
    dout, q, k, v, out, lse = _op_inputs()
    d1, q1, k1, v1, o1, l1 = (t[0] for t in _op_inputs(sk=33))
    cu = _cu([33])
    k3, v3 = (t[:, :, :1].expand(-1, -1, 3, -1).contiguous() for t in (k, v))
    d12 = [t[..., :12].contiguous() for t in (dout, q, k, v, out)]
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    bwd = ops.flash_attn_backward
    calls = {
        "lse shape": (ValueError, lambda: bwd(dout, q, k, v, out, lse[:, :, 1:], 0.2, True)),
        "lse dtype": (ValueError, lambda: bwd(dout, q, k, v, out, lse.double(), 0.2, True)),
        "out dtype": (TypeError, lambda: bwd(dout, q, k, v, out.half(), lse, 0.2, True)),
        "dout shape": (ValueError, lambda: bwd(dout[:, 1:], q, k, v, out, lse, 0.2, True)),
        "heads": (ValueError, lambda: bwd(dout, q, k3, v3, out, lse, 0.2, True)),
        "head dim": (ValueError, lambda: bwd(*d12, lse, 0.2, True)),
        "non-contiguous": (ValueError, lambda: bwd(dout, q_strided, k, v, out, lse, 0.2, True)),
        "cu_seqlens on cpu": (ValueError, lambda: ops.flash_attn_varlen_backward(
            d1, q1, k1, v1, o1, l1, cu.cpu(), cu, 33, 33, 0.2, True)),
        "cu_seqlens dtype": (TypeError, lambda: ops.flash_attn_varlen_backward(
            d1, q1, k1, v1, o1, l1, cu.long(), cu, 33, 33, 0.2, True)),
        "cu_seqlens lengths": (ValueError, lambda: ops.flash_attn_varlen_backward(
            d1, q1, k1, v1, o1, l1, cu, _cu([30, 3]), 33, 33, 0.2, True)),
    }
    return calls[name]


@pytest.mark.parametrize("name", ["lse shape", "lse dtype", "out dtype", "dout shape", "heads", "head dim",
                                  "non-contiguous", "cu_seqlens on cpu", "cu_seqlens dtype",
                                  "cu_seqlens lengths"])
def test_bad_input_raises_clear_error(name):
    error, call = _bad_call(name)
    with pytest.raises(error):
        call()
