"""cfg_sample / contrastive_sample: exact distributions, exact draws, determinism, invariance, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm3leon_kernels import _C, cfg_sample, contrastive_sample, reference

from sampling_checks import (CFG_CASES, N, V, assert_distribution, cfg_case_inputs, check_empty_row_raises,
                             check_every_output_written, inverse_cdf_draw, random_logits)


@pytest.mark.parametrize("case", CFG_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cfg_distribution(case):
    base, opts = cfg_case_inputs(case, N)
    tokens, logprobs = cfg_sample(base.expand(N, -1, -1), seed=1234, step=7, return_logprobs=True, **opts)
    ref_opts = dict(opts)
    if "allowed_mask" in ref_opts and ref_opts["allowed_mask"].dim() == 2:
        ref_opts["allowed_mask"] = ref_opts["allowed_mask"][:1]
    probs = reference.cfg_probs(base, **ref_opts)[0]
    assert (probs > 0).sum() >= 3 and probs.max() < 0.8, "test case must leave a real choice"
    assert_distribution(tokens, probs)
    # logprobs: the log-probability of each drawn token under the exact final distribution
    torch.testing.assert_close(logprobs.double(), probs.log()[tokens], atol=2e-4, rtol=0)


@pytest.mark.parametrize("case", [
    dict(alpha=0.1, k=1),
    dict(alpha=0.05, k=3, temperature=0.8, amateur_temperature=0.5),
    dict(alpha=0.2, k=2, allowed_range=(5, 95), dtype=torch.bfloat16),
    dict(alpha=0.0, k=1, temperature=1.5),
], ids=str)
def test_contrastive_distribution(case):
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    x = random_logits(2, scale=1.2, seed=5, dtype=dtype)
    amateur, expert = x[:, 0], x[:, 1]
    seeds = torch.arange(N, dtype=torch.int64) * 7919 + 11  # per-row seeds this time
    tokens, logprobs = contrastive_sample(expert.expand(N, -1), amateur.expand(N, -1), seed=seeds, step=0,
                                          return_logprobs=True, **case)
    probs = reference.contrastive_probs(expert, amateur, **case)[0]
    assert (probs > 0).sum() >= 2, "test case must leave a choice"
    assert_distribution(tokens, probs)
    torch.testing.assert_close(logprobs.double(), probs.log()[tokens], atol=2e-4, rtol=0)


def test_contrastive_expert_temperature_equivalence():
    """The documented reparametrisation: CD-K with an expert temperature t (p_exp = softmax(expert / t), scores
    sampled at temperature 1) equals alpha ** t, temperature = t, amateur_temperature / t here."""
    x = random_logits(2, batch=3, seed=8).double()
    expert, amateur = x[:, 1], x[:, 0]
    alpha, k, t, t_ama = 0.1, 2, 0.7, 0.8
    log_p_exp = torch.log_softmax(expert / t, -1)
    kth = log_p_exp.topk(k, -1).values[:, -1:]
    head = log_p_exp >= kth + math.log(alpha)
    score = (log_p_exp - torch.log_softmax(amateur / t_ama, -1)).masked_fill(~head, -math.inf)
    ours = reference.contrastive_probs(expert, amateur, alpha=alpha ** t, k=k, temperature=t,
                                       amateur_temperature=t_ama / t)
    torch.testing.assert_close(ours, torch.softmax(score, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("opts", [
    dict(top_k=50, top_p=0.9),
    dict(top_p=0.5, temperature=0.8),
    dict(top_k=1000, min_p=0.01, allowed_range=(1000, 9192)),
    dict(top_k=300, top_p=0.95, allowed_mask=True),
    dict(min_p=0.001, allowed_mask=True, allowed_range=(50, 16000)),
    dict(),
], ids=str)
def test_cfg_exact_draw_large_vocab(opts):
    """Each row's token is exactly the float64 inverse-CDF draw with the row's Philox uniform: checks every
    threshold (radix selection over many bins) on a realistic vocabulary, row by row."""
    batch, vocab, seed, step = 24, 16411, 99, 3
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(batch, 2, vocab, generator=g) * 2
    logits[:, :, 100:140] += 6  # a head of likely tokens, as in real LM outputs
    if opts.pop("integer_logits", False):
        logits = logits.round()
    if opts.get("allowed_mask"):
        opts["allowed_mask"] = torch.rand(batch, vocab, generator=g) < 0.7
    tokens = cfg_sample(logits, guidance_scale=2.5, seed=seed, step=step, **opts)
    probs = reference.cfg_probs(logits, guidance_scale=2.5, **opts)
    u = torch.tensor([_C.philox_uniform(seed, r, step) for r in range(batch)], dtype=torch.float64)
    expected, safe = inverse_cdf_draw(probs, u)
    assert safe.all()
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("opts", [dict(alpha=0.01, k=5),
                                  dict(alpha=0.1, k=1, temperature=0.7, amateur_temperature=0.5)], ids=str)
def test_contrastive_exact_draw_large_vocab(opts):
    batch, vocab, step = 16, 16411, 9
    g = torch.Generator().manual_seed(6)
    expert, amateur = torch.randn(2, batch, vocab, generator=g) * 2
    expert[:, 200:260] += 5
    seeds = torch.arange(batch, dtype=torch.int64) + 1000
    tokens = contrastive_sample(expert, amateur, seed=seeds, step=step, **opts)
    probs = reference.contrastive_probs(expert, amateur, **opts)
    u = torch.tensor([_C.philox_uniform(1000 + r, 0, step) for r in range(batch)], dtype=torch.float64)
    expected, safe = inverse_cdf_draw(probs, u)
    assert safe.all()
    assert torch.equal(tokens, expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 5), streams=st.sampled_from([1, 2, 3]), vocab=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]), top_k=st.integers(0, 40),
       top_p=st.sampled_from([1.0, 0.3, 0.9]), min_p=st.sampled_from([0.0, 0.1]),
       integer_logits=st.booleans(), data=st.data())
def test_cfg_matches_reference_draw_property(batch, streams, vocab, dtype, temperature, top_k, top_p, min_p,
                                             integer_logits, data):
    """Random shapes and options: every token equals the float64 inverse-CDF draw with the row's uniform
    (rows whose uniform or top-p mass lies within float rounding of a boundary are skipped)."""
    lo = data.draw(st.integers(0, vocab - 1))
    hi = data.draw(st.integers(lo + 1, vocab))
    scales = {1: None, 2: 2.0, 3: (1.5, 3.0)}[streams]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = torch.randn(batch, streams, vocab, generator=g) * 2
    x = (x.round() if integer_logits else x).to(dtype)
    opts = dict(temperature=temperature, top_k=min(top_k, vocab), top_p=top_p, min_p=min_p, allowed_range=(lo, hi))
    tokens, logprobs = cfg_sample(x, guidance_scale=scales, seed=77, step=5, return_logprobs=True, **opts)
    probs = reference.cfg_probs(x, guidance_scale=scales, **opts)
    assert torch.all((tokens >= lo) & (tokens < hi))
    if temperature == 0:
        assert torch.equal(tokens, probs.argmax(-1))
        return
    u = torch.tensor([_C.philox_uniform(77, r, 5) for r in range(batch)], dtype=torch.float64)
    expected, safe = inverse_cdf_draw(probs, u)
    if top_p < 1:  # the kept set must not hinge on float rounding of the nucleus mass
        for near in (top_p - 1e-5, min(top_p + 1e-5, 1.0)):
            other = reference.cfg_probs(x, guidance_scale=scales, **{**opts, "top_p": near})
            safe &= ((other > 0) == (probs > 0)).all(-1)
    assert torch.equal(tokens[safe], expected[safe])
    torch.testing.assert_close(logprobs[safe].double(), probs[safe].log().gather(1, tokens[safe, None])[:, 0],
                               atol=2e-4, rtol=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), vocab=st.integers(1, 300), k=st.integers(1, 20),
       alpha=st.sampled_from([0.0, 0.05, 0.3, 1.0]), temperature=st.sampled_from([0.0, 0.7, 1.0]),
       amateur_temperature=st.sampled_from([0.5, 1.0]), integer_logits=st.booleans(), seed=st.integers(0, 2**31))
def test_contrastive_matches_reference_draw_property(batch, vocab, k, alpha, temperature, amateur_temperature,
                                                     integer_logits, seed):
    g = torch.Generator().manual_seed(seed)
    expert, amateur = torch.randn(2, batch, vocab, generator=g) * 2
    if integer_logits:
        expert, amateur = expert.round(), amateur.round()
    opts = dict(alpha=alpha, k=min(k, vocab), temperature=temperature, amateur_temperature=amateur_temperature)
    tokens = contrastive_sample(expert, amateur, seed=3, step=1, **opts)
    probs = reference.contrastive_probs(expert, amateur, **opts)
    if temperature == 0:
        assert torch.equal(tokens, probs.argmax(-1))
        return
    u = torch.tensor([_C.philox_uniform(3, r, 1) for r in range(batch)], dtype=torch.float64)
    expected, safe = inverse_cdf_draw(probs, u)
    assert torch.equal(tokens[safe], expected[safe])


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32_10.
    assert _C.philox4x32_10([0, 0, 0, 0], 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _C.philox4x32_10([0xFFFFFFFF] * 4, 0xFFFFFFFF, 0xFFFFFFFF) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                                         0x6D5451FD]
    assert _C.philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], 0xA4093822, 0x299F31D0) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_determinism_and_step():
    x = random_logits(2, batch=64, vocab=500)
    a = cfg_sample(x, guidance_scale=2.0, seed=5, step=1)
    assert torch.equal(a, cfg_sample(x, guidance_scale=2.0, seed=5, step=1))
    assert torch.equal(a, cfg_sample(x, guidance_scale=2.0, seed=5, step=torch.tensor(1)))
    assert not torch.equal(a, cfg_sample(x, guidance_scale=2.0, seed=5, step=2))
    assert not torch.equal(a, cfg_sample(x, guidance_scale=2.0, seed=6, step=1))
    # numpy scalars are accepted wherever Python numbers are.
    assert torch.equal(a, cfg_sample(x, guidance_scale=np.float32(2.0), seed=np.int64(5), step=np.int32(1),
                                     top_k=np.int64(500)))
    # Unsigned and signed spellings of the same 64 bits are the same seed.
    assert torch.equal(cfg_sample(x, guidance_scale=2.0, seed=2**64 - 1, step=0),
                       cfg_sample(x, guidance_scale=2.0, seed=-1, step=0))


def test_per_row_seed_batch_invariance():
    x = random_logits(2, batch=16, vocab=3001, seed=9)
    seeds = torch.randint(0, 2**62, (16,), dtype=torch.int64)
    opts = dict(guidance_scale=3.0, top_k=40, top_p=0.9, seed=seeds, step=11)
    full = cfg_sample(x, **opts)
    perm = torch.randperm(16)
    assert torch.equal(cfg_sample(x[perm], **{**opts, "seed": seeds[perm]}), full[perm])
    for r in range(0, 16, 5):  # alone, via a tensor seed and via an int seed (B = 1 uses row 0)
        assert cfg_sample(x[r:r + 1], **{**opts, "seed": seeds[r:r + 1]}).item() == full[r].item()
        assert cfg_sample(x[r:r + 1], **{**opts, "seed": int(seeds[r])}).item() == full[r].item()
    e, a = x[:, 1], x[:, 0]
    cd = contrastive_sample(e, a, k=3, seed=seeds, step=2)
    assert torch.equal(contrastive_sample(e[perm], a[perm], k=3, seed=seeds[perm], step=2), cd[perm])


@pytest.mark.parametrize("opts", [dict(top_p=0.95), dict(top_k=30, min_p=0.01), dict(temperature=0.0)], ids=str)
def test_thread_count_invariance(opts):
    """Same tokens with 1 or 2 threads, and for a row alone (B = 1 splits the row over threads) or in a batch
    (rows over threads)."""
    x = random_logits(2, batch=5, vocab=40000, seed=3)
    seeds = torch.arange(5, dtype=torch.int64) * 3 + 1
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, prev)):
            torch.set_num_threads(threads)
            batch = cfg_sample(x, guidance_scale=2.0, seed=seeds, step=0, **opts)
            alone = torch.cat([cfg_sample(x[r:r + 1], guidance_scale=2.0, seed=seeds[r:r + 1], step=0, **opts)
                               for r in range(5)])
            cd = contrastive_sample(x[:, 1], x[:, 0], k=4, seed=seeds, step=0)
            cd_alone = torch.cat([contrastive_sample(x[r:r + 1, 1], x[r:r + 1, 0], k=4, seed=seeds[r:r + 1],
                                                     step=0) for r in range(5)])
            assert torch.equal(batch, alone) and torch.equal(cd, cd_alone)
            results.append((batch, cd))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    x = torch.randint(-4, 4, (64, 2, 301)).to(dtype)  # integer logits: many ties, argmax takes the lowest
    tokens, logprobs = cfg_sample(x, guidance_scale=2.0, temperature=0.0, top_k=5, top_p=0.5, seed=0, step=0,
                                  return_logprobs=True)
    assert torch.equal(tokens, reference.cfg_mix(x, 2.0).argmax(-1))
    assert torch.all(logprobs == 0)
    lo, hi = 100, 200
    tokens = cfg_sample(x, guidance_scale=2.0, temperature=0.0, allowed_range=(lo, hi), seed=0, step=0)
    assert torch.equal(tokens, reference.cfg_mix(x, 2.0)[:, lo:hi].argmax(-1) + lo)
    e, a = x[:, 1], x[:, 0]
    cd = contrastive_sample(e, a, alpha=0.5, k=2, temperature=0.0, seed=0, step=0)
    assert torch.equal(cd, reference.contrastive_probs(e, a, alpha=0.5, k=2, temperature=0.0).argmax(-1))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_written(temperature):
    check_every_output_written(temperature, "cpu")


def test_neg_inf_excludes_and_strided_input():
    x = random_logits(2, batch=4000, vocab=V)
    x[:, 0, :10] = -math.inf  # unconditional -inf excludes, whatever the conditional says
    x[:, 1, 20] = -math.inf
    wide = torch.zeros(4000, 3, V + 5)
    wide[:, :2, :V] = x
    tokens = cfg_sample(wide[:, :2, :V], guidance_scale=2.0, seed=0, step=0)  # strided rows and streams
    assert torch.equal(tokens, cfg_sample(x.contiguous(), guidance_scale=2.0, seed=0, step=0))
    assert not ((tokens < 10) | (tokens == 20)).any()


def test_integer_like_allowed_range():
    """numpy integers (e.g. from a numpy-built vocabulary) work as allowed_range bounds, like top_k and k."""
    x = random_logits(2, batch=64)
    expected = cfg_sample(x, guidance_scale=2.0, allowed_range=(5, 9), seed=0, step=0)
    assert torch.equal(cfg_sample(x, guidance_scale=2.0, allowed_range=(np.int64(5), np.int32(9)), seed=0, step=0),
                       expected)
    assert ((expected >= 5) & (expected < 9)).all()


@pytest.mark.parametrize("seed", [3, torch.zeros(0, dtype=torch.int64)], ids=["int", "tensor"])
def test_empty_batch(seed):
    """B = 0 returns empty outputs (it used to divide by the batch size and kill the process with SIGFPE)."""
    x = random_logits(2, batch=1)[:0]
    tokens, logprobs = cfg_sample(x, guidance_scale=2.0, seed=seed, step=0, return_logprobs=True)
    assert tokens.shape == (0,) and tokens.dtype == torch.int64 and logprobs.shape == (0,)
    tokens = contrastive_sample(x[:, 1], x[:, 0], seed=seed, step=0)
    assert tokens.shape == (0,) and tokens.dtype == torch.int64


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(guidance_scale=2.0, temperature=-1.0), ValueError, "temperature"),
    (dict(guidance_scale=2.0, top_p=0.0), ValueError, "top_p"),
    (dict(guidance_scale=2.0, top_p=1.5), ValueError, "top_p"),
    (dict(guidance_scale=2.0, min_p=2.0), ValueError, "min_p"),
    (dict(guidance_scale=2.0, top_k=V + 1), ValueError, "top_k"),
    (dict(guidance_scale=2.0, top_k=2.5), TypeError, "top_k"),
    (dict(guidance_scale=(1.0, 2.0)), ValueError, "guidance_scale"),
    (dict(guidance_scale=None), ValueError, "guidance_scale"),
    (dict(guidance_scale=2.0, allowed_range=(5, 5)), ValueError, "allowed_range"),
    (dict(guidance_scale=2.0, allowed_range=(0, V + 1)), ValueError, "allowed_range"),
    (dict(guidance_scale=2.0, allowed_mask=torch.ones(V + 1, dtype=torch.bool)), ValueError, "allowed_mask"),
    (dict(guidance_scale=2.0, allowed_mask=torch.ones(V)), TypeError, "allowed_mask"),
    (dict(guidance_scale=2.0, seed=1.5), TypeError, "seed"),
    (dict(guidance_scale=2.0, seed=torch.zeros(3, dtype=torch.int64)), ValueError, "seed"),
    (dict(guidance_scale=2.0, seed=torch.zeros(4, dtype=torch.int32)), TypeError, "seed"),
    (dict(guidance_scale=2.0, step=-1), ValueError, "step"),
    (dict(guidance_scale=2.0, step=torch.zeros(2, dtype=torch.int64)), ValueError, "step"),
    (dict(guidance_scale=2.0, allowed_range=(False, True)), TypeError, "allowed_range"),
    (dict(guidance_scale=2.0, allowed_range=(1.0, 5)), TypeError, "allowed_range"),
    (dict(guidance_scale=2.0, temperature=math.inf), ValueError, "temperature must be a finite number"),
])
def test_cfg_bad_arguments(kwargs, exc, match):
    kwargs = {"seed": 0, "step": 0, **kwargs}
    with pytest.raises(exc, match=match):
        cfg_sample(random_logits(2, batch=4), **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_raise(bad):
    x = random_logits(2, batch=4)
    x[2, 1, 7] = bad
    with pytest.raises(ValueError, match="row 2 holds NaN or \\+inf"):
        cfg_sample(x, guidance_scale=2.0, seed=0, step=0)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        contrastive_sample(x[:, 1], x[:, 0], seed=0, step=0)
    big = torch.full((1, 2, 5), 3e38)
    big[0, 0] = -3e38
    with pytest.raises(ValueError, match="non-finite"):  # the mix overflows float32
        cfg_sample(big, guidance_scale=3.0, seed=0, step=0)
    with pytest.raises(ValueError, match="row 0 .*non-finite"):  # so does dividing by a tiny temperature
        cfg_sample(random_logits(1, batch=2, vocab=100) + 10, guidance_scale=None, temperature=1e-38, seed=0, step=0)
    e = random_logits(1, batch=2, vocab=100)[:, 0]
    with pytest.raises(ValueError, match="non-finite"):
        contrastive_sample(e + 10, e - 10, temperature=1e-38, seed=0, step=0)


def test_empty_row_raises():
    check_empty_row_raises("cpu")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(k=0), ValueError, "k"),
    (dict(k=V + 1), ValueError, "k"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(amateur_temperature=0.0), ValueError, "amateur_temperature"),
])
def test_contrastive_bad_arguments(kwargs, exc, match):
    x = random_logits(2, batch=4)
    with pytest.raises(exc, match=match):
        contrastive_sample(x[:, 1], x[:, 0], seed=0, step=0, **kwargs)
    with pytest.raises(ValueError, match="amateur_logits"):
        contrastive_sample(x[:, 1], x[:2, 0], seed=0, step=0)


def test_opcheck():
    x = random_logits(2, batch=5, vocab=97)
    mask = torch.rand(97) < 0.5
    seeds = torch.arange(5, dtype=torch.int64)
    ops = torch.ops.cm3leon
    torch.library.opcheck(ops.cfg_sample.default,
                          (x, [2.0], 0.9, 10, 0.9, 0.01, 3, 90, mask, 0, seeds, 0, torch.tensor(4)))
    torch.library.opcheck(ops.cfg_sample.default, (x[:, :1], [], 1.0, 0, 1.0, 0.0, 0, 97, None, 7, None, 3, None))
    torch.library.opcheck(ops.contrastive_sample.default,
                          (x[:, 1], x[:, 0], 0.1, 2, 1.0, 0.5, 0, 97, None, 1, None, 0, None))
    xg = x.clone().requires_grad_()
    torch.library.opcheck(ops.cfg_sample.default, (xg, [2.0], 1.0, 5, 1.0, 0.0, 0, 97, None, 0, None, 0, None))


def test_negative_step_raises_through_raw_ops_and_cpu_step_tensors():
    # A negative step would wrap to stream position 2^64 - 1 instead of failing.
    x = random_logits(2, batch=2, vocab=31)
    ops = torch.ops.cm3leon
    with pytest.raises(ValueError, match="step must be >= 0"):
        ops.cfg_sample(x[:, :1], [], 1.0, 0, 1.0, 0.0, 0, 31, None, 0, None, -1, None)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ops.contrastive_sample(x[:, 1], x[:, 0], 0.1, 1, 1.0, 1.0, 0, 31, None, 0, None, -3, None)
    with pytest.raises(ValueError, match="step tensor must hold a value >= 0"):
        cfg_sample(x, guidance_scale=2.0, seed=0, step=torch.tensor(-1))
    with pytest.raises(ValueError, match="step tensor must hold a value >= 0"):
        contrastive_sample(x[:, 1], x[:, 0], seed=0, step=torch.tensor(-2))


def test_outputs_carry_no_gradient():
    x = random_logits(2, batch=3, vocab=50).requires_grad_()
    _, logprobs = cfg_sample(x, guidance_scale=2.0, seed=0, step=0, return_logprobs=True)
    _, cd_logprobs = contrastive_sample(x[:, 1], x[:, 0], seed=0, step=0, return_logprobs=True)
    assert not logprobs.requires_grad and not cd_logprobs.requires_grad


def test_torch_compile_fullgraph():
    x = random_logits(2, batch=6, vocab=211)
    seeds = torch.arange(6, dtype=torch.int64)

    def step_fn(logits, step):
        a = cfg_sample(logits, guidance_scale=2.0, top_k=20, top_p=0.9, seed=seeds, step=step)
        b = contrastive_sample(logits[:, 1], logits[:, 0], k=2, seed=seeds, step=step)
        return a, b

    compiled = torch.compile(step_fn, fullgraph=True)
    for s in range(3):
        step = torch.tensor(s)
        got, want = compiled(x, step), step_fn(x, step)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_torch_compile_fullgraph_changing_guidance_scale():
    # A float argument whose value changes between calls becomes symbolic on the recompile: the finiteness
    # check of the guidance scales must trace it without a graph break.
    x2, x3 = random_logits(2, batch=3, vocab=50), random_logits(3, batch=3, vocab=50)

    def step_fn(s):
        return (cfg_sample(x2, guidance_scale=s, seed=0, step=1),
                cfg_sample(x3, guidance_scale=(s, 1.5), seed=0, step=1))

    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    for s in (1.5, 2.5, 3.5):
        got, want = compiled(s), step_fn(s)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
