"""Attention dropout (dropout_p > 0) on the CPU: the keep mask's statistics and reproducibility, forward and
gradients against the float64 reference given the kernels' own mask (flash_attn_dropout_mask), S_dmask,
argument errors, opcheck and torch.compile."""
from __future__ import annotations

import math

import pytest
import torch

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref
from cm3leon_kernels._native import ops

from attention_checks import (FEATURE_EPS, FEATURE_GRAD_EPS, case_id, check_against_reference, cu_seqlens,
                              leaves, random_slopes)
from helpers import FLOAT_DTYPES



def _seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _drawn_seed() -> torch.Tensor:
    """The seed flash_attn_* draws from torch's generator (call after the same torch.manual_seed)."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)


def _mask(seed, shape, p):
    return ops.flash_attn_dropout_mask(seed, *shape, p)


# ---- the mask -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.05, 0.17, 0.5, 0.9])
def test_drop_fraction_is_binomial(p):
    """Over n elements the dropped count is Binomial(n, p): |count - n p| <= 6 sigma fails with probability
    < 2e-9 per check (5 checks per p: all elements and each Philox lane j % 4)."""
    keep = _mask(_seed(1234), (3, 5, 257, 263), p)
    for name, part in [("all", keep)] + [(f"lane {i}", keep[..., i::4]) for i in range(4)]:
        n = part.numel()
        dropped = n - int(part.sum())
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(dropped - n * p) <= 6 * sigma, f"{name}: dropped {dropped} of {n}, expected {n * p:.0f}"


def test_mask_depends_on_seed_and_position_only():
    shape = (2, 3, 40, 50)
    a = _mask(_seed(7), shape, 0.3)
    assert torch.equal(a, _mask(_seed(7), shape, 0.3)), "same seed, same mask"
    assert not torch.equal(a, _mask(_seed(8), shape, 0.3)), "another seed, another mask"
    assert torch.equal(a[:, :, :17, :23], _mask(_seed(7), (2, 3, 17, 23), 0.3)), "element (b, h, i, j) fixed"
    big = _mask(_seed(7), shape, 0.6)
    assert not (big & ~a).any(), "a larger p only drops more: kept at 0.6 implies kept at 0.3"
    assert _mask(_seed(7), shape, 0.0).all()
    streams = a.reshape(6, -1)
    assert all(not torch.equal(streams[0], s) for s in streams[1:]), "each (batch, head) has its own stream"


def test_mask_is_the_same_for_any_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mask(_seed(99), (2, 4, 130, 70), 0.25)
        torch.set_num_threads(2)
        two = _mask(_seed(99), (2, 4, 130, 70), 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# ---- forward and gradients against the reference ---------------------------------------------------------

# batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window, softcap, alibi, deterministic, p
DENSE_CASES = [
    (2, 37, 53, 4, 2, 59, False, (-1, -1), 0.0, None, False, 0.17),   # odd head dim, GQA
    (1, 160, 300, 2, 1, 111, True, (40, -1), 0.0, None, True, 0.3),   # causal window, several key blocks
    (2, 100, 100, 4, 4, 40, False, (-1, -1), 5.0, None, False, 0.5),  # softcap
    (2, 90, 130, 4, 2, 8, True, (-1, -1), 0.0, "heads", False, 0.1),  # ALiBi
    (2, 77, 77, 2, 1, 3, False, (9, 2), 2.0, "batch", True, 0.2),     # all three, head dim 3, deterministic
    (1, 250, 90, 3, 1, 16, False, (0, 0), 0.0, None, False, 0.4),     # rows without keys
    (2, 3, 65, 4, 1, 64, False, (-1, -1), 0.0, None, False, 0.25),    # short queries (decode-sized)
    (1, 300, 310, 2, 2, 256, True, (-1, -1), 0.0, None, False, 0.9),  # head dim 256, p = 0.9
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", DENSE_CASES, ids=case_id)
def test_dense_matches_reference_with_the_kernel_mask(case, dtype):
    b, sq, sk, hq, hkv, d, causal, window, softcap, alibi, det, p = case
    if dtype != torch.float32 and d in (3, 256):
        pytest.skip("half-precision runs cover the common head dims; odd ones run in float32")
    if dtype != torch.float32 and window == (0, 0):
        # A query with one key has dS = P (dP / (1 - p) - dO.O) = 0 exactly in PyTorch, but the kernel's D
        # uses the rounded O: its error, scaled by 1 / (1 - p), exceeds the half-precision floor. float32 runs
        # it.
        pytest.skip("one-key rows in half precision (see comment)")
    torch.manual_seed(0)
    q = torch.randn(b, sq, hq, d).to(dtype)
    k, v = torch.randn(b, sk, hkv, d).to(dtype), torch.randn(b, sk, hkv, d).to(dtype)
    slopes, seed, scale = random_slopes(alibi, b, hq), _seed(2024 + sq), 0.7 / math.sqrt(d)
    mask = _mask(seed, (b, hq, sq, sk), p)
    check_against_reference(
        lambda q, k, v: ops.flash_attn_forward(q, k, v, scale, causal, *window, softcap, slopes, det, p,
                                               seed),
        lambda q, k, v: ref.attention(q, k, v, scale, causal, window, softcap, slopes, p, mask),
        (q, k, v), dtype, case_id(case), eps=FEATURE_EPS, grad_eps=FEATURE_GRAD_EPS)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).split(".")[1])
def test_varlen_matches_reference_with_the_kernel_mask(dtype):
    docs = [(40, 40), (0, 7), (130, 150), (5, 0), (77, 60)]  # empty documents on either side
    lq, lk = [x for x, _ in docs], [x for _, x in docs]
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    torch.manual_seed(1)
    q = torch.randn(sum(lq), 4, 59).to(dtype)
    k, v = torch.randn(sum(lk), 2, 59).to(dtype), torch.randn(sum(lk), 2, 59).to(dtype)
    slopes, seed, p = random_slopes("batch", len(docs), 4), _seed(5), 0.3
    mask = _mask(seed, (len(docs), 4, max(lq), max(lk)), p)
    check_against_reference(
        lambda q, k, v: ops.flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.2, True, 16,
                                                      -1, 0.0, slopes, False, p, seed),
        lambda q, k, v: ref.attention_varlen(q, k, v, cu_q, cu_k, 0.2, True, (16, -1), 0.0, slopes, p, mask),
        (q, k, v), dtype, "varlen", eps=FEATURE_EPS, grad_eps=FEATURE_GRAD_EPS)


def test_backward_needs_the_forward_seed():
    """The gradients depend on the mask: the backward given another seed is wrong (so the reference checks
    above would catch a backward that does not regenerate the forward's mask)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 50, 2, 16) for _ in range(3))
    out, lse = ops.flash_attn_forward(q, k, v, 0.25, False, dropout_p=0.3, dropout_seed=_seed(1))
    dout = torch.randn_like(out)
    right, wrong = (ops.flash_attn_backward(dout, q, k, v, out, lse, 0.25, False, dropout_p=0.3,
                                            dropout_seed=_seed(s)) for s in (1, 2))
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(right, wrong))


# ---- reproducibility through the public API --------------------------------------------------------------

def _train_step(q, k, v, dout, **kw):
    x = leaves(q, k, v)
    out, lse, s_dmask = ck.flash_attn_func(*x, return_attn_probs=True, **kw)
    out.backward(dout)
    return [out.detach(), lse, s_dmask] + [t.grad for t in x]


def test_torch_seed_reproduces_a_run_and_other_seeds_differ():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 70, 4, 32) for _ in range(3))
    dout = torch.randn_like(q)
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(_train_step(q, k, v, dout, dropout_p=0.2, causal=True))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])), "torch.manual_seed must reproduce a run"
    assert not torch.equal(runs[0][2] < 0, runs[2][2] < 0), "another torch seed must give another mask"
    assert not torch.equal(runs[0][0], runs[2][0])


def test_one_and_two_threads_give_identical_results():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 200, 4, 48) for _ in range(3))
    dout = torch.randn_like(q)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(21)
            results.append(_train_step(q, k, v, dout, dropout_p=0.35, window_size=(60, 10),
                                       deterministic=True))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_no_dropout_draws_nothing_and_returns_no_s_dmask():
    q = torch.randn(1, 9, 2, 16)
    state = torch.get_rng_state()
    out, lse, s_dmask = ck.flash_attn_func(q, q, q, 0.0, return_attn_probs=True)
    assert s_dmask is None
    assert torch.equal(state, torch.get_rng_state()), "dropout_p = 0 must leave torch's generator alone"


# ---- S_dmask -------------------------------------------------------------------------------------------

def test_s_dmask_holds_the_unnormalised_probabilities_and_the_mask():
    torch.manual_seed(5)
    q = torch.randn(2, 33, 4, 24).half()
    k, v = torch.randn(2, 47, 2, 24).half(), torch.randn(2, 47, 2, 24).half()
    slopes = random_slopes("heads", 2, 4)
    torch.manual_seed(8)
    out, lse, s_dmask = ck.flash_attn_func(q, k, v, 0.25, causal=True, window_size=(12, -1), softcap=3.0,
                                           alibi_slopes=slopes, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 33, 47) and s_dmask.dtype == torch.float16
    torch.manual_seed(8)
    seed = _drawn_seed()  # the draw flash_attn_func made
    keep = _mask(seed, (2, 4, 33, 47), 0.25)
    scores = ref.attention_scores(q.double(), k.double(), None, True, (12, -1), 3.0, slopes)
    hidden = torch.isneginf(scores)
    e, row_max = ref.softmax_numerator(scores)
    assert (s_dmask[hidden] == 0).all() and not torch.signbit(s_dmask[hidden]).any()
    visible = ~hidden
    assert torch.equal(s_dmask[visible] >= 0, keep[visible]), "the sign must be the kernels' mask"
    torch.testing.assert_close(s_dmask.abs().double()[visible], e[visible], atol=1e-3, rtol=1e-3)
    # FlashAttention's test normalises |S_dmask| by exp(row_max - lse): the softmax.
    probs = s_dmask.abs().double() * torch.exp(row_max - lse.double()[..., None])
    torch.testing.assert_close(probs, torch.softmax(scores, -1).nan_to_num(), atol=1e-3, rtol=1e-3)


def test_varlen_s_dmask_puts_each_document_top_left():
    docs = [(5, 9), (0, 4), (12, 6)]
    lq, lk = [x for x, _ in docs], [x for _, x in docs]
    q, k, v = torch.randn(sum(lq), 2, 16), torch.randn(sum(lk), 2, 16), torch.randn(sum(lk), 2, 16)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    torch.manual_seed(9)
    _, _, s_dmask = ck.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 9, 0.5, return_attn_probs=True)
    assert s_dmask.shape == (3, 2, 12, 9)
    torch.manual_seed(9)
    keep = _mask(_drawn_seed(), (3, 2, 12, 9), 0.5)
    cq, ck_ = cu_q.tolist(), cu_k.tolist()
    for b, (nq, nk) in enumerate(docs):
        block = s_dmask[b, :, :nq, :nk]
        assert torch.equal(block >= 0, keep[b, :, :nq, :nk])
        scores = ref.attention_scores(q[None, cq[b]:cq[b + 1]], k[None, ck_[b]:ck_[b + 1]])
        e, _ = ref.softmax_numerator(scores)
        torch.testing.assert_close(block.abs(), e[0])
        outside = torch.ones(2, 12, 9, dtype=torch.bool)
        outside[:, :nq, :nk] = False
        assert (s_dmask[b][outside] == 0).all()


# ---- errors ---------------------------------------------------------------------------------------------

BAD_P = [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
         (True, TypeError), ("0.1", TypeError)]


@pytest.mark.parametrize("bad,exc", BAD_P, ids=str)
def test_python_api_rejects_bad_dropout_p(bad, exc):
    q = torch.randn(1, 8, 2, 16)
    cu = cu_seqlens([8])
    calls = [lambda: ck.flash_attn_func(q, q, q, bad),
             lambda: ck.flash_attn_qkvpacked_func(torch.stack([q, q, q], 2), bad),
             lambda: ck.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 8, 8, bad)]
    for call in calls:
        with pytest.raises(exc, match="dropout_p"):
            call()


def _raw_calls(p, seed):
    q = torch.randn(1, 8, 2, 16)
    out, lse = ops.flash_attn_forward(q, q, q, 0.3, False)
    q3, cu = q[0], cu_seqlens([8])
    o3, l3 = ops.flash_attn_varlen_forward(q3, q3, q3, cu, cu, 8, 8, 0.3, False)
    drop = dict(dropout_p=p, dropout_seed=seed)
    return {
        "forward": lambda: ops.flash_attn_forward(q, q, q, 0.3, False, **drop),
        "backward": lambda: ops.flash_attn_backward(out, q, q, q, out, lse, 0.3, False, **drop),
        "varlen_forward": lambda: ops.flash_attn_varlen_forward(q3, q3, q3, cu, cu, 8, 8, 0.3, False, **drop),
        "varlen_backward": lambda: ops.flash_attn_varlen_backward(o3, q3, q3, q3, o3, l3, cu, cu, 8, 8, 0.3,
                                                                  False, **drop),
        "dropout_mask": lambda: ops.flash_attn_dropout_mask(_seed(0) if seed is None else seed, 1, 2, 8, 8,
                                                            p),
    }


# The raw ops take a C++ double: True arrives as 1.0 (and False as 0.0, no dropout), so True fails the range.
@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), float("-inf"), True], ids=str)
def test_raw_ops_reject_bad_dropout_p(bad):
    for name, call in _raw_calls(bad, _seed(0)).items():
        with pytest.raises(ValueError, match="dropout_p"):
            call()


def test_raw_ops_check_the_seed():
    for seed, exc, match in [(None, ValueError, "dropout_seed is required"),
                             (torch.tensor(1.0), TypeError, "dropout_seed must be int64"),
                             (torch.tensor([1, 2]), ValueError, "dropout_seed must hold one int64")]:
        for name, call in _raw_calls(0.1, seed).items():
            if name == "dropout_mask" and seed is None:
                continue  # its seed is not optional
            with pytest.raises(exc, match=match):
                call()


# ---- torch.library integration -----------------------------------------------------------------------------

def test_opcheck_with_dropout():
    q, k, v = leaves(*(torch.randn(2, 9, 2, 16) for _ in range(3)))
    seed = _seed(31)
    drop = dict(dropout_p=0.2, dropout_seed=seed)
    torch.library.opcheck(ops.flash_attn_forward, (q, k, v, 0.3, True), drop)
    out, lse = ops.flash_attn_forward(q, k, v, 0.3, True, **drop)
    torch.library.opcheck(ops.flash_attn_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                    out.detach(), lse, 0.3, True), drop)
    cu = cu_seqlens([3, 0, 6])
    q3, k3, v3 = leaves(*(t.detach()[0] for t in (q, k, v)))
    torch.library.opcheck(ops.flash_attn_varlen_forward, (q3, k3, v3, cu, cu, 6, 6, 0.3, False), drop)
    torch.library.opcheck(ops.flash_attn_dropout_mask, (seed, 2, 3, 5, 7, 0.4))


def test_torch_compile_fullgraph_matches_eager():
    """The seed is a tensor drawn inside the traced function, so fullgraph capture works and (with the eager
    generator) the compiled step reproduces the eager one."""
    q, k, v = (torch.randn(2, 40, 4, 32) for _ in range(3))

    def step(q, k, v):
        out, _, s_dmask = ck.flash_attn_func(q, k, v, 0.3, causal=True, return_attn_probs=True)
        return (out ** 2).sum(), s_dmask

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        x = leaves(q, k, v)
        torch.manual_seed(17)
        loss, s_dmask = fn(*x)
        loss.backward()
        results.append([loss.detach(), s_dmask] + [t.grad for t in x])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
