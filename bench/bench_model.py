"""End-to-end tokens/s of the thin model: packed training steps and batched CFG decoding.

Baseline: the same model and weights with PyTorch SDPA attention and the Hugging Face-style sampling chain
(CFG mix, temperature, top-k, top-p via sort, softmax, multinomial).
"""
from __future__ import annotations

import pytest
import torch
from cm3leon.baselines import SDPA

import cm3leon_kernels as ck
from cm3leon import CM3Leon, preset
from cm3leon.generate import SamplingOptions, generate
from cm3leon.model import KERNELS
from cm3leon_kernels import reference

CONFIG = preset("demo")
BACKENDS = {"cm3leon": KERNELS, "torch-sdpa+hf-chain": SDPA}


def _model(impl: str) -> CM3Leon:
    torch.manual_seed(0)
    return CM3Leon(CONFIG.replace(zero_init_output_proj=False), attention_backend=BACKENDS[impl])


@pytest.mark.parametrize("impl", list(BACKENDS))
def test_train_step_packed(benchmark, bench_record, impl):
    """Forward + backward of 2048 packed tokens (documents of 100-400 tokens), as the trainer feeds them."""
    model = _model(impl).train()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 400, (64,), generator=g)
    lengths = lengths[: int((lengths.cumsum(0) <= 2048).sum())]
    lengths[-1] += 2048 - lengths.sum()
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    tokens = torch.randint(0, CONFIG.vocab_size, (2048,), generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens, cu_seqlens=cu, max_seqlen=int(lengths.max()))
        torch.nn.functional.cross_entropy(logits[:-1], tokens[1:]).backward()

    step()
    bench_record(benchmark, case="train step: demo preset, 2048 packed tokens", impl=impl, work=2048,
                 unit="tok/s")
    benchmark.pedantic(step, rounds=3, iterations=1)


def _hf_chain_cfg_sample(logits, *, guidance_scale, temperature, top_k, top_p, seed, step, **_):
    return reference.hf_chain_sample(logits, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                     top_p=top_p)


@pytest.mark.parametrize("impl", list(BACKENDS))
def test_cfg_decode(benchmark, bench_record, impl, monkeypatch):
    """8 requests x 2 CFG streams: 64-token prompts, 64 generated tokens (top-k 50, top-p 0.9)."""
    model = _model(impl).eval()
    if impl != "cm3leon":  # generate() looks cfg_sample up on cm3leon_kernels at call time
        monkeypatch.setattr(ck, "cfg_sample", _hf_chain_cfg_sample)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, CONFIG.vocab_size, (64,), generator=g).tolist() for _ in range(8)]
    uncond = [[3] * 8 for _ in range(8)]
    options = SamplingOptions(temperature=1.0, top_k=50, top_p=0.9, guidance_scale=3.0)
    run = lambda: generate(model, prompts, unconditional_prompts=uncond, max_new_tokens=64, options=options)
    run()
    bench_record(benchmark, case="CFG decode: demo preset, 8 requests x 2 streams x 64 tokens", impl=impl,
                 work=8 * 64, unit="tok/s")
    benchmark.pedantic(run, rounds=3, iterations=1)
