"""CM3Leon.loss: the weighted next-token cross entropy the trainer optimises, against a float64 reference."""
from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import LAYOUTS, small_model

from cm3leon.model import AttentionBackend, CM3Leon
from cm3leon_kernels import reference

# A float64 twin of the model: same weights, attention from the plain-PyTorch reference.
REFERENCE = AttentionBackend(
    lambda q, k, v, causal=False, **_: reference.attention(q, k, v, causal=causal)[0],
    lambda q, k, v, cq, ck, mq, mk, causal=False, **_: reference.attention_varlen(q, k, v, cq, ck,
                                                                                  causal=causal)[0],
    None)


def _float64_twin(model: CM3Leon) -> CM3Leon:
    twin = copy.deepcopy(model).double()
    for block in twin.blocks:
        block.attn.backend = REFERENCE
    return twin


def _reference_loss(model: CM3Leon, tokens, targets, weights, **kw) -> torch.Tensor:
    logits = _float64_twin(model)(tokens, **kw).reshape(-1, model.config.vocab_size)
    ce = -torch.log_softmax(logits, -1).gather(1, targets.reshape(-1, 1)).squeeze(1)
    w = weights.reshape(-1).double()
    return (w * ce).sum() / w.sum()


def _packed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 12, 1, 9]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    tokens = torch.randint(0, 97, (sum(lengths),), generator=g)
    targets = torch.randint(0, 97, (sum(lengths),), generator=g)
    weights = torch.rand(sum(lengths), generator=g)
    weights[::3] = 0.0  # sentinel-like positions the objective does not train on
    return tokens, targets, weights, cu


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_loss_and_gradient_match_float64_reference(layout):
    model = small_model(layout).train()
    tokens, targets, weights, cu = _packed_batch()
    loss = model.loss(tokens, targets, weights, cu_seqlens=cu, max_seqlen=12)
    loss.backward()
    twin = _float64_twin(model)
    ref = _reference_loss(model, tokens, targets, weights, cu_seqlens=cu)
    ref_twin = twin.loss(tokens, targets, weights.double(), cu_seqlens=cu)  # same method, float64 weights
    ref_twin.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_twin, ref, rtol=1e-12, atol=1e-12)
    for (name, p), p64 in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_batched_loss_matches_reference_and_weights_select_positions():
    model = small_model("cm3leon")
    tokens = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    weights = torch.ones(2, 10)
    weights[1] = 0.0  # the second row does not count at all
    with torch.no_grad():
        loss = model.loss(tokens, targets, weights)
        only_first = model.loss(tokens[:1], targets[:1], weights[:1])
    torch.testing.assert_close(loss.double(), _reference_loss(model, tokens, targets, weights), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(loss, only_first)


def test_all_zero_weights_give_zero_loss_and_zero_gradients():
    model = small_model("cm3leon").train()
    tokens, targets, weights, cu = _packed_batch()
    loss = model.loss(tokens, targets, torch.zeros_like(weights), cu_seqlens=cu)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() == 0 for p in model.parameters())


def test_loss_under_bf16_autocast_reduces_in_float32():
    model = small_model("cm3leon")
    tokens, targets, weights, cu = _packed_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(tokens, targets, weights, cu_seqlens=cu)
    assert loss.dtype == torch.float32
    ref = _reference_loss(model, tokens, targets, weights, cu_seqlens=cu)
    assert abs(loss.double() - ref) < 0.05 * ref


@pytest.mark.parametrize("change,error,match", [
    (lambda t, y, w: (t, y[:-1], w), ValueError, "targets"),
    (lambda t, y, w: (t, y, w[:-1]), ValueError, "loss_weights"),
    (lambda t, y, w: (t, y.float(), w), TypeError, "targets"),
    (lambda t, y, w: (t, y, w.long()), TypeError, "loss_weights"),
    # the loss kernel's own check (no host-device synchronisation in the model)
    (lambda t, y, w: (t, y + 97, w), IndexError, r"targets\[0\] = \d+ is not in \[0, 97\)"),
])
def test_bad_input(change, error, match):
    model = small_model("cm3leon")
    tokens, targets, weights, cu = _packed_batch()
    tokens, targets, weights = change(tokens, targets, weights)
    with pytest.raises(error, match=match):
        model.loss(tokens, targets, weights, cu_seqlens=cu)
