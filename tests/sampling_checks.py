"""Shared by the CPU and CUDA sampler tests: test logits, the distribution check with its stated false-alarm
rate, the reference inverse-CDF draw, and the checks both devices run."""
from __future__ import annotations

import math

import pytest
import torch

from cm3leon_kernels import cfg_sample, contrastive_sample

from helpers import poisoned_outputs


V = 101          # small vocabulary for the distribution tests: one full 64-token SIMD chunk + a scalar tail


N = 1 << 18      # draws per distribution test (262,144)


# Total-variation bound for N i.i.d. draws from p over V categories:
#   E[TV] = 1/2 sum_i E|p̂_i - p_i| <= 1/2 sum_i sqrt(p_i / N) <= 1/2 sqrt(V / N)   (Jensen, Cauchy-Schwarz),
# and one draw moves TV by at most 1/N, so McDiarmid gives P(TV >= E[TV] + t) <= exp(-2 N t^2).
# With a false-alarm probability of 1e-9 per test, t = sqrt(ln(1e9) / (2N)). For V = 101, N = 2^18 the bound is
# about 0.016, while e.g. dropping or wrongly keeping a token of probability 3% moves TV by >= 0.03.
TV_BOUND = 0.5 * math.sqrt(V / N) + math.sqrt(math.log(1e9) / (2 * N))


def random_logits(streams: int, *, scale: float = 1.5, vocab: int = V, batch: int = 1, seed: int = 1,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, streams, vocab, generator=g) * scale).to(dtype)


def empirical(tokens: torch.Tensor, vocab: int = V) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def assert_distribution(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    emp = empirical(tokens, probs.numel())
    tv = 0.5 * (emp - probs).abs().sum().item()
    assert tv <= TV_BOUND, f"TV {tv:.4f} > bound {TV_BOUND:.4f}"
    never = probs == 0
    assert emp[never].sum() == 0, f"filtered tokens drawn: {never.nonzero().flatten().tolist()}"


CFG_CASES = [
    dict(streams=1, guidance_scale=None),
    dict(streams=2, guidance_scale=3.0, temperature=0.7),
    dict(streams=3, guidance_scale=(1.5, 2.5)),
    dict(streams=2, guidance_scale=2.0, top_k=5),
    dict(streams=2, guidance_scale=2.0, top_p=0.8),
    dict(streams=1, guidance_scale=None, min_p=0.05),
    dict(streams=2, guidance_scale=1.5, temperature=1.3, top_k=10, top_p=0.9, min_p=0.02, allowed_range=(3, 90)),
    dict(streams=2, guidance_scale=2.0, top_p=0.7, allowed_mask="vector"),
    dict(streams=1, guidance_scale=None, top_k=4, top_p=0.95, allowed_mask="rows"),
    dict(streams=2, guidance_scale=2.0, top_k=8, dtype=torch.bfloat16),
    dict(streams=3, guidance_scale=(1.5, 7.5), top_p=0.85, dtype=torch.float16),
    dict(streams=1, guidance_scale=None, top_k=3, top_p=0.6, integer_logits=True),  # ties at both thresholds
]


def mix_gain(streams: int, guidance_scale) -> float:
    """Standard deviation of the mixed logits for i.i.d. unit-variance streams."""
    if streams == 1:
        return 1.0
    if streams == 2:
        return math.hypot(1 - guidance_scale, guidance_scale)
    s_img, s_txt = guidance_scale
    return math.sqrt((1 - s_img) ** 2 + (s_img - s_txt) ** 2 + s_txt ** 2)


def cfg_case_inputs(case: dict, batch: int):
    case = dict(case)
    streams = case.pop("streams")
    dtype = case.pop("dtype", torch.float32)
    # Mixed logits with standard deviation 1.2 whatever the guidance, so the filters keep several tokens.
    scale = 1.2 / mix_gain(streams, case["guidance_scale"])
    if case.pop("integer_logits", False):
        base = torch.randint(-3, 3, (1, streams, V), generator=torch.Generator().manual_seed(2)).float().to(dtype)
    else:
        base = random_logits(streams, scale=scale, dtype=dtype)
    mask = case.pop("allowed_mask", None)
    if mask is not None:
        vec = torch.rand(V, generator=torch.Generator().manual_seed(3)) < 0.6
        case["allowed_mask"] = vec if mask == "vector" else vec.expand(batch, V).contiguous()
    return base, case


def inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference draw in token order, and whether u is safely away (1e-6) from a CDF step."""
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(1).clamp(max=probs.shape[-1] - 1)
    margin = (cdf - u[:, None] * cdf[:, -1:]).abs().min(dim=-1).values
    return pick, margin > 1e-6


def check_every_output_written(temperature, device):
    """Poisoned outputs: every token and logprob of both samplers is written and valid. Shared with CUDA."""
    x = random_logits(3, batch=7, vocab=5000).to(device)
    with poisoned_outputs():
        tokens, logprobs = cfg_sample(x, guidance_scale=(1.5, 3.0), temperature=temperature, top_k=20, seed=1,
                                      step=0, return_logprobs=True)
        cd_tokens, cd_logprobs = contrastive_sample(x[:, 2], x[:, 0], temperature=temperature, seed=1, step=0,
                                                    return_logprobs=True)
    for t, lp in ((tokens, logprobs), (cd_tokens, cd_logprobs)):
        assert torch.all((t >= 0) & (t < 5000)) and torch.all(torch.isfinite(lp)) and torch.all(lp <= 0)


def check_empty_row_raises(device):
    """Rows left without an allowed token raise, naming the row. Shared with the CUDA tests."""
    x = random_logits(2, batch=3).to(device)
    mask = torch.ones(3, V, dtype=torch.bool, device=device)
    mask[1] = False
    with pytest.raises(ValueError, match="row 1 has no allowed token"):
        cfg_sample(x, guidance_scale=2.0, allowed_mask=mask, seed=0, step=0)
    x[0, 0, 3:] = -math.inf
    with pytest.raises(ValueError, match="row 0 has no allowed token"):
        cfg_sample(x, guidance_scale=2.0, allowed_range=(3, V), seed=0, step=0)
    with pytest.raises(ValueError, match="row 0 has no allowed token"):
        contrastive_sample(x[:, 1], x[:, 0], allowed_range=(3, V), seed=0, step=0)
