"""Fused q/k/v and gate/up projections: same outputs, same state dict and checkpoint format."""
from __future__ import annotations

import pytest
import torch
from model_fixtures import small_model

import cm3leon
from cm3leon.generate import SamplingOptions, generate


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("layout", ["cm3leon", "chameleon"])
def test_fused_model_computes_the_same_and_saves_the_same_format(layout, transpose, tmp_path):
    model = small_model(layout)
    tokens = torch.randint(0, 97, (2, 9))
    expected = model(tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    options = SamplingOptions(temperature=1.0, guidance_scale=2.0)
    sampled = generate(model, [[1, 2, 3]], unconditional_prompts=[[3]], max_new_tokens=5, options=options, seeds=1)

    assert model.fuse_projections(transpose=transpose) is model
    assert model.fuse_projections(transpose=transpose) is model  # idempotent
    attn = model.blocks[0].attn
    fused = attn.qkv_proj.weight_t.T if transpose else attn.qkv_proj.weight
    assert attn.q_proj is None and fused.shape == (64 + 2 * 16 * attn.n_kv_heads, 64)
    assert hasattr(attn.o_proj, "weight_t") == transpose
    assert (model.blocks[0].ffn.gate_up is not None) == (layout == "chameleon")
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-6)
    cache = model.allocate_cache(2, 16)
    torch.testing.assert_close(model.step(tokens, cache), expected, rtol=1e-4, atol=1e-5)
    assert generate(model, [[1, 2, 3]], unconditional_prompts=[[3]], max_new_tokens=5, options=options,
                    seeds=1) == sampled

    fused_state = model.state_dict()
    assert list(sorted(fused_state)) == list(sorted(state))
    for name, tensor in state.items():
        assert torch.equal(fused_state[name], tensor), name
    cm3leon.save(model, tmp_path / "m.safetensors")
    reloaded = cm3leon.load(tmp_path / "m.safetensors")
    torch.testing.assert_close(reloaded(tokens), expected, rtol=1e-5, atol=1e-6)
    # an unfused state dict loads into a fused model
    other = small_model(layout, seed=1).fuse_projections(transpose=transpose)
    other.load_state_dict(state)
    torch.testing.assert_close(other(tokens), expected, rtol=1e-5, atol=1e-6)
