"""cfg_sample / contrastive_sample on CUDA: the same tokens as the CPU kernel, exact distributions, greedy,
logprobs, every filter, S = 1/2/3, CD-K, bad input, opcheck, and CUDA-graph capture of a decode loop.

The CPU kernel is the oracle for whole tokens: both draw the same Philox uniform for (seed, row, step) and
apply the same fp32 thresholds, so they pick the same token except where the uniform (or the top-p mass)
lies within float rounding of a boundary; such rows are identified with the float64 reference and skipped.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import cm3leon_kernels
from cm3leon_kernels import _C, cfg_sample, contrastive_sample, reference

from sampling_checks import (CFG_CASES, N, V, assert_distribution, cfg_case_inputs, check_empty_row_raises,
                             check_every_output_written, inverse_cdf_draw, random_logits)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and cm3leon_kernels.cuda_built()),
                                reason="needs a CUDA GPU and a build with the CUDA kernels")

DEV = "cuda"


def _cuda(opts: dict) -> dict:
    """opts with every tensor moved to the GPU."""
    return {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}


def _stable_rows(x: torch.Tensor, opts: dict, u: torch.Tensor, probs_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference draw, and the rows whose token cannot hinge on rounding: the uniform is 1e-6 away
    from every CDF step, and moving top_p by 1e-5 (far more than float rounding of the mass) draws the same."""
    expected, safe = inverse_cdf_draw(probs_fn(x, **opts), u)
    if opts.get("top_p", 1.0) < 1.0:
        for near in (opts["top_p"] - 1e-5, min(opts["top_p"] + 1e-5, 1.0)):
            other, other_safe = inverse_cdf_draw(probs_fn(x, **{**opts, "top_p": near}), u)
            safe &= other_safe & (other == expected)
    return expected, safe


def _random_cfg_case(rng: random.Random) -> tuple[torch.Tensor, dict, int | torch.Tensor]:
    """Random logits and options covering every filter, S, dtype, range/mask, tail and alignment."""
    batch = rng.choice([1, 3, 16])
    vocab = rng.choice([1, 7, 101, 1000, 4099, 16411, 70001])  # 70001 > the shared-memory row cache
    streams = rng.choice([1, 2, 3])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(batch, streams, vocab, generator=g) * rng.choice([1.0, 3.0])
    if rng.random() < 0.3:
        x = x.round()  # ties at every threshold
    if vocab > 200 and rng.random() < 0.5:
        x[:, :, 100:140] += 6  # a head of likely tokens
    lo = rng.choice([0, 0, 1, 3]) if vocab > 3 else 0  # odd starts: unaligned rows take the scalar loads
    hi = vocab - rng.choice([0, 0, 1]) if vocab - 1 > lo else vocab
    opts = dict(guidance_scale={1: None, 2: rng.choice([1.5, 3.0]), 3: (1.5, 2.5)}[streams],
                temperature=rng.choice([0.0, 0.7, 1.0, 1.3]),
                top_k=min(rng.choice([0, 0, 1, 5, 50, 5000]), vocab),  # 5000 > the candidate buffer
                top_p=rng.choice([1.0, 1.0, 0.5, 0.9, 0.99]),
                min_p=rng.choice([0.0, 0.0, 0.05]),
                allowed_range=(lo, hi))
    mask_kind = rng.choice([None, None, "vector", "rows"])
    if mask_kind is not None:
        keep = torch.rand(batch if mask_kind == "rows" else 1, vocab, generator=g) < 0.7
        keep[:, lo] = True  # no empty rows here (tested separately)
        opts["allowed_mask"] = keep if mask_kind == "rows" else keep[0]
    seed = torch.randint(0, 2**62, (batch,), generator=g) if rng.random() < 0.5 else rng.randrange(2**63)
    return x.to(dtype), opts, seed


def _row_uniforms(seed: int | torch.Tensor, batch: int, step: int) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return torch.tensor([_C.philox_uniform(int(s), 0, step) for s in seed], dtype=torch.float64)
    return torch.tensor([_C.philox_uniform(seed, r, step) for r in range(batch)], dtype=torch.float64)


def _count_same_draws(gpu, cpu, safe, ctx, compared, skipped):
    """Asserts CUDA and CPU drew the same tokens and log-probabilities on the ``safe`` rows (those whose
    uniform is not at a rounding edge of the CDF); returns the running (compared, skipped) row counts."""
    (gpu_tok, gpu_lp), (cpu_tok, cpu_lp) = gpu, cpu
    assert torch.equal(gpu_tok[safe], cpu_tok[safe]), ctx
    torch.testing.assert_close(gpu_lp[safe], cpu_lp[safe], atol=1e-5, rtol=0, msg=ctx)
    return compared + int(safe.sum()), skipped + int((~safe).sum())


def test_cfg_same_tokens_as_cpu():
    """The strongest check: many random rows and settings, token for token against the CPU kernel."""
    rng = random.Random(1234)
    compared = skipped = 0
    for case in range(80):
        x, opts, seed = _random_cfg_case(rng)
        step = case * 7 + 1
        cpu_tok, cpu_lp = cfg_sample(x, seed=seed, step=step, return_logprobs=True, **opts)
        gpu_seed = seed.to(DEV) if isinstance(seed, torch.Tensor) else seed
        gpu_tok, gpu_lp = cfg_sample(x.to(DEV), seed=gpu_seed, step=step, return_logprobs=True, **_cuda(opts))
        gpu_tok, gpu_lp = gpu_tok.cpu(), gpu_lp.cpu()
        if opts["temperature"] == 0:
            safe = torch.ones_like(cpu_tok, dtype=torch.bool)
        else:
            _, safe = _stable_rows(x, opts, _row_uniforms(seed, x.shape[0], step), reference.cfg_probs)
        ctx = f"case {case}: shape {tuple(x.shape)} {x.dtype} {opts}"
        compared, skipped = _count_same_draws((gpu_tok, gpu_lp), (cpu_tok, cpu_lp), safe, ctx, compared, skipped)
    assert compared >= 10 * max(skipped, 1), f"too many rows skipped: {skipped} of {compared + skipped}"


def test_contrastive_same_tokens_as_cpu():
    rng = random.Random(99)
    compared = skipped = 0
    for case in range(40):
        batch, vocab = rng.choice([1, 5, 16]), rng.choice([3, 101, 4099, 70001])
        g = torch.Generator().manual_seed(case)
        expert, amateur = torch.randn(2, batch, vocab, generator=g) * 2
        if rng.random() < 0.3:
            expert, amateur = expert.round(), amateur.round()
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        expert, amateur = expert.to(dtype), amateur.to(dtype)
        opts = dict(alpha=rng.choice([0.0, 0.05, 0.1, 1.0]), k=min(rng.choice([1, 2, 5, 5000]), vocab),
                    temperature=rng.choice([0.0, 0.7, 1.0]), amateur_temperature=rng.choice([0.5, 1.0]),
                    allowed_range=(rng.choice([0, 1]) if vocab > 1 else 0, vocab))
        seeds = torch.randint(0, 2**62, (batch,), generator=g)
        cpu_tok, cpu_lp = contrastive_sample(expert, amateur, seed=seeds, step=case, return_logprobs=True, **opts)
        gpu_tok, gpu_lp = contrastive_sample(expert.to(DEV), amateur.to(DEV), seed=seeds.to(DEV), step=case,
                                             return_logprobs=True, **opts)
        gpu_tok, gpu_lp = gpu_tok.cpu(), gpu_lp.cpu()
        if opts["temperature"] == 0:
            safe = torch.ones_like(cpu_tok, dtype=torch.bool)
        else:
            probs = reference.contrastive_probs(expert, amateur, **opts)
            _, safe = inverse_cdf_draw(probs, _row_uniforms(seeds, batch, case))
        ctx = f"case {case}: [{batch}, {vocab}] {dtype} {opts}"
        compared, skipped = _count_same_draws((gpu_tok, gpu_lp), (cpu_tok, cpu_lp), safe, ctx, compared, skipped)
    assert compared >= 10 * max(skipped, 1), f"too many rows skipped: {skipped} of {compared + skipped}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_contrastive_subnormal_logits_same_tokens_as_cpu(dtype):
    """Subnormal expert (and amateur) logits are kept, as on the CPU: the samplers are built with --ftz=false.
    With alpha = 1 the head set is {expert >= k-th largest}; flushing subnormals to zero would merge it."""
    g = torch.Generator().manual_seed(7)
    batch, vocab = 16, 1000
    expert = torch.ldexp((torch.randn(batch, vocab, generator=g) * 8).round(), torch.tensor(-133))
    amateur = torch.randn(batch, vocab, generator=g)
    amateur[::2] = torch.ldexp((amateur[::2] * 8).round(), torch.tensor(-133))  # subnormal scores too
    assert (expert.abs() < torch.finfo(torch.float32).tiny).all() and (expert != 0).any()
    expert, amateur = expert.to(dtype), amateur.to(dtype)
    for step, (k, temperature) in enumerate([(1, 0.0), (2, 0.0), (5, 1.0), (1, 1.0)]):
        opts = dict(alpha=1.0, k=k, temperature=temperature, amateur_temperature=0.7)
        seeds = torch.randint(0, 2**62, (batch,), generator=g)
        cpu_tok, cpu_lp = contrastive_sample(expert, amateur, seed=seeds, step=step, return_logprobs=True, **opts)
        gpu_tok, gpu_lp = contrastive_sample(expert.to(DEV), amateur.to(DEV), seed=seeds.to(DEV), step=step,
                                             return_logprobs=True, **opts)
        safe = torch.ones_like(cpu_tok, dtype=torch.bool)
        if temperature > 0:  # skip rows whose uniform lies within rounding of a CDF step
            probs = reference.contrastive_probs(expert, amateur, **opts)
            _, safe = inverse_cdf_draw(probs, _row_uniforms(seeds, batch, step))
        assert safe.sum() >= batch // 2, opts
        assert torch.equal(gpu_tok.cpu()[safe], cpu_tok[safe]), opts
        torch.testing.assert_close(gpu_lp.cpu()[safe], cpu_lp[safe], atol=1e-5, rtol=0, msg=str(opts))


@pytest.mark.parametrize("case", CFG_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cfg_distribution(case):
    """N draws on the GPU against the exact float64 distribution (total-variation bound of test_sampling)."""
    base, opts = cfg_case_inputs(case, N)
    tokens, logprobs = cfg_sample(base.to(DEV).expand(N, -1, -1), seed=4321, step=3, return_logprobs=True,
                                  **_cuda(opts))
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    ref_opts = dict(opts)
    if "allowed_mask" in ref_opts and ref_opts["allowed_mask"].dim() == 2:
        ref_opts["allowed_mask"] = ref_opts["allowed_mask"][:1]
    probs = reference.cfg_probs(base, **ref_opts)[0]
    assert_distribution(tokens, probs)
    torch.testing.assert_close(logprobs.double(), probs.log()[tokens], atol=2e-4, rtol=0)


@pytest.mark.parametrize("case", [dict(alpha=0.1, k=1), dict(alpha=0.05, k=3, temperature=0.8,
                                                              amateur_temperature=0.5),
                                  dict(alpha=0.2, k=2, allowed_range=(5, 95), dtype=torch.bfloat16)], ids=str)
def test_contrastive_distribution(case):
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    x = random_logits(2, scale=1.2, seed=5, dtype=dtype)
    amateur, expert = x[:, 0], x[:, 1]
    seeds = (torch.arange(N, dtype=torch.int64) * 7919 + 11).to(DEV)
    tokens, logprobs = contrastive_sample(expert.to(DEV).expand(N, -1), amateur.to(DEV).expand(N, -1), seed=seeds,
                                          step=0, return_logprobs=True, **case)
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    probs = reference.contrastive_probs(expert, amateur, **case)[0]
    assert_distribution(tokens, probs)
    torch.testing.assert_close(logprobs.double(), probs.log()[tokens], atol=2e-4, rtol=0)


@pytest.mark.parametrize("opts", [dict(top_k=50, top_p=0.9), dict(top_p=0.5, temperature=0.8),
                                  dict(top_k=5000, min_p=0.001), dict(top_p=0.999), dict()], ids=str)
@pytest.mark.parametrize("vocab", [16411, 70001])
def test_cfg_exact_draw_large_vocab(opts, vocab):
    """Each token is the float64 inverse-CDF draw with the row's uniform, on vocabularies that fill (16411) or
    overflow (70001) the shared-memory row cache, with top-k / top-p sets too large for the candidate buffer."""
    batch, seed, step = 24, 99, 3
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(batch, 2, vocab, generator=g) * 2
    logits[:, :, 100:140] += 6
    tokens = cfg_sample(logits.to(DEV), guidance_scale=2.5, seed=seed, step=step, **opts).cpu()
    expected, safe = _stable_rows(logits, dict(guidance_scale=2.5, **opts), _row_uniforms(seed, batch, step),
                                  reference.cfg_probs)
    assert safe.sum() >= batch - 2
    assert torch.equal(tokens[safe], expected[safe])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    x = torch.randint(-4, 4, (64, 2, 301)).to(dtype)  # integer logits: many ties, argmax takes the lowest
    tokens, logprobs = cfg_sample(x.to(DEV), guidance_scale=2.0, temperature=0.0, top_k=5, top_p=0.5, seed=0,
                                  step=0, return_logprobs=True)
    assert torch.equal(tokens.cpu(), reference.cfg_mix(x, 2.0).argmax(-1))
    assert torch.all(logprobs == 0)
    tokens = cfg_sample(x.to(DEV), guidance_scale=2.0, temperature=0.0, allowed_range=(100, 200), seed=0, step=0)
    assert torch.equal(tokens.cpu(), reference.cfg_mix(x, 2.0)[:, 100:200].argmax(-1) + 100)
    e, a = x[:, 1], x[:, 0]
    cd = contrastive_sample(e.to(DEV), a.to(DEV), alpha=0.5, k=2, temperature=0.0, seed=0, step=0)
    assert torch.equal(cd.cpu(), reference.contrastive_probs(e, a, alpha=0.5, k=2, temperature=0.0).argmax(-1))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_written(temperature):
    check_every_output_written(temperature, DEV)


def test_neg_inf_excludes_and_strided_input():
    x = random_logits(2, batch=4000, vocab=V)
    x[:, 0, :10] = -math.inf
    x[:, 1, 20] = -math.inf
    wide = torch.zeros(4000, 3, V + 5)
    wide[:, :2, :V] = x
    tokens = cfg_sample(wide.to(DEV)[:, :2, :V], guidance_scale=2.0, seed=0, step=0)
    assert torch.equal(tokens, cfg_sample(x.to(DEV), guidance_scale=2.0, seed=0, step=0))
    assert not ((tokens < 10) | (tokens == 20)).any()


def test_step_forms_agree():
    """An int step, a CPU step tensor and a CUDA step tensor draw the same; other steps/seeds differ."""
    x = random_logits(2, batch=64, vocab=500).to(DEV)
    a = cfg_sample(x, guidance_scale=2.0, seed=5, step=1)
    assert torch.equal(a, cfg_sample(x, guidance_scale=2.0, seed=5, step=torch.tensor(1)))
    assert torch.equal(a, cfg_sample(x, guidance_scale=2.0, seed=5, step=torch.tensor(1, device=DEV)))
    assert not torch.equal(a, cfg_sample(x, guidance_scale=2.0, seed=5, step=2))
    assert not torch.equal(a, cfg_sample(x, guidance_scale=2.0, seed=6, step=1))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_raise(bad):
    x = random_logits(2, batch=4)
    x[2, 1, 7] = bad
    with pytest.raises(ValueError, match="row 2 holds NaN or \\+inf"):
        cfg_sample(x.to(DEV), guidance_scale=2.0, seed=0, step=0)
    with pytest.raises(ValueError, match="row 2 holds NaN or \\+inf"):
        contrastive_sample(x[:, 1].to(DEV), x[:, 0].to(DEV), seed=0, step=0)
    big = torch.full((1, 2, 5), 3e38)
    big[0, 0] = -3e38
    with pytest.raises(ValueError, match="non-finite"):  # the mix overflows float32
        cfg_sample(big.to(DEV), guidance_scale=3.0, seed=0, step=0)
    with pytest.raises(ValueError, match="row 0 .*non-finite"):  # so does dividing by a tiny temperature
        cfg_sample(random_logits(1, batch=2, vocab=100).to(DEV) + 10, guidance_scale=None, temperature=1e-38, seed=0,
                   step=0)
    e = random_logits(1, batch=2, vocab=100)[:, 0].to(DEV)
    with pytest.raises(ValueError, match="non-finite"):
        contrastive_sample(e + 10, e - 10, temperature=1e-38, seed=0, step=0)


def test_empty_row_raises():
    check_empty_row_raises(DEV)


def test_device_mismatch_raises():
    x = random_logits(2, batch=3).to(DEV)
    with pytest.raises(ValueError, match="allowed_mask"):
        cfg_sample(x, guidance_scale=2.0, allowed_mask=torch.ones(V, dtype=torch.bool), seed=0, step=0)
    with pytest.raises(ValueError, match="seed"):
        cfg_sample(x, guidance_scale=2.0, seed=torch.zeros(3, dtype=torch.int64), step=0)
    with pytest.raises(ValueError, match="device"):
        contrastive_sample(x[:, 1], x[:, 0].cpu(), seed=0, step=0)


def test_opcheck():
    x = random_logits(2, batch=5, vocab=97).to(DEV)
    mask = (torch.rand(97) < 0.5).to(DEV)
    seeds = torch.arange(5, dtype=torch.int64, device=DEV)
    ops = torch.ops.cm3leon
    torch.library.opcheck(ops.cfg_sample.default, (x, [2.0], 0.9, 10, 0.9, 0.01, 3, 90, mask, 0, seeds, 0,
                                                   torch.tensor(4, device=DEV)))
    torch.library.opcheck(ops.cfg_sample.default, (x[:, :1], [], 1.0, 0, 1.0, 0.0, 0, 97, None, 7, None, 3, None))
    torch.library.opcheck(ops.contrastive_sample.default,
                          (x[:, 1], x[:, 0], 0.1, 2, 1.0, 0.5, 0, 97, None, 1, None, 0, None))


def test_cuda_graph_decode_loop():
    """A captured step: the kernel reads the step from device memory, so each replay draws anew, exactly as
    eager calls with step = 0, 1, 2, ... do."""
    x = random_logits(2, batch=8, vocab=4099, seed=3).to(DEV)
    seeds = torch.arange(8, dtype=torch.int64, device=DEV) + 100
    step = torch.zeros((), dtype=torch.int64, device=DEV)
    opts = dict(guidance_scale=2.0, top_k=40, top_p=0.9, seed=seeds)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs recommends
        cfg_sample(x, step=step, **opts)
        contrastive_sample(x[:, 1], x[:, 0], k=2, seed=seeds, step=step)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = cfg_sample(x, step=step, **opts)
        cd_tokens = contrastive_sample(x[:, 1], x[:, 0], k=2, seed=seeds, step=step)
        step.add_(1)
    replays = []
    for s in range(4):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tokens, cfg_sample(x, step=s, **opts))
        assert torch.equal(cd_tokens, contrastive_sample(x[:, 1], x[:, 0], k=2, seed=seeds, step=s))
        replays.append(tokens.clone())
    assert int(step) == 4
    assert any(not torch.equal(replays[0], r) for r in replays[1:]), "replays must advance the randomness"


def test_cuda_graph_bad_row_is_marked():
    """Under capture the status cannot be read back: a bad row yields token -1 and logprob NaN instead."""
    x = random_logits(2, batch=4, vocab=300).to(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cfg_sample(x, guidance_scale=2.0, seed=0, step=0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logprobs = cfg_sample(x, guidance_scale=2.0, seed=0, step=0, return_logprobs=True)
    x[1, 0, 5] = math.nan
    graph.replay()
    torch.cuda.synchronize()
    assert tokens[1].item() == -1 and math.isnan(logprobs[1].item())
    ok = torch.tensor([0, 2, 3], device=DEV)
    assert torch.all(tokens[ok] >= 0) and torch.all(torch.isfinite(logprobs[ok]))
