"""Fused linear + cross-entropy against float64 references (contract: docs/loss.md)."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_fa_rule, poisoned_outputs

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

ops = torch.ops.cm3leon
# T around the 6/16-token tiles and the 192-token chunk, D around the 16-wide strips and the 256-deep slices,
# V around the 6-row tiles and the 96-row vocabulary block (never a multiple of 96 except once).
SHAPES = [(1, 1, 1), (7, 5, 11), (6, 16, 96), (33, 17, 97), (200, 40, 301), (193, 257, 50), (5, 33, 1000)]
OPTIONS = {
    "plain": {},
    "weighted": {"weights": True},
    "all": {"weights": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0},
}


def _inputs(t: int, d: int, v: int, dtype=torch.float32, *, weights=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) / d ** 0.5 * 2).to(dtype)
    targets = torch.randint(0, v, (t,), generator=gen)
    targets[torch.rand(t, generator=gen) < 0.25] = -100
    lw = None
    if weights:  # zeros and non-integers
        lw = torch.rand(t, generator=gen) * 2
        lw[torch.rand(t, generator=gen) < 0.2] = 0.0
    return hidden, weight, targets, lw


def _loss_and_grads(fn, hidden, weight, targets, grad_seed=1, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, lse = fn(h, w, targets, return_lse=True, **kw)
    # A non-uniform upstream gradient for "none" (the case Liger-Kernel once got wrong).
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed)).to(loss.dtype)
    gh, gw = torch.autograd.grad(loss, (h, w), up)
    return loss, lse, gh, gw


def _check(t, d, v, dtype, reduction, options, eps=1e-5):
    opts = dict(options)
    hidden, weight, targets, lw = _inputs(t, d, v, dtype, weights=opts.pop("weights", False))
    kw = dict(loss_weights=lw, reduction=reduction, **opts)
    with poisoned_outputs():
        out = _loss_and_grads(ck.linear_cross_entropy, hidden, weight, targets, **kw)
    exact = _loss_and_grads(ref.linear_cross_entropy, hidden.double(), weight.double(), targets,
                            **(kw | {"loss_weights": None if lw is None else lw.double()}))
    base = _loss_and_grads(ref.linear_cross_entropy, hidden, weight, targets, **kw)
    assert out[0].dtype == torch.float32 and out[2].dtype == dtype and out[3].dtype == dtype
    for name, o, e, b in zip(("loss", "lse", "grad_hidden", "grad_weight"), out, exact, base):
        assert_fa_rule(o, e, b, name=f"{name} {reduction} {options}", eps=eps)


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("t,d,v", SHAPES)
def test_matches_float64_reference(t, d, v, reduction, options):
    _check(t, d, v, torch.float32, reduction, options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_16_bit_inputs(dtype, reduction):
    _check(70, 40, 130, dtype, reduction, OPTIONS["all"], eps=1e-3)


def test_all_ignored_and_zero_weights_give_zero():
    hidden, weight, targets, _ = _inputs(9, 8, 20)
    for tg, lw in ((torch.full_like(targets, -100), None), (targets.clamp(min=0), torch.zeros(9))):
        for reduction in ("mean", "sum", "none"):
            loss, _, gh, gw = _loss_and_grads(ck.linear_cross_entropy, hidden, weight, tg, loss_weights=lw,
                                              reduction=reduction)
            assert not loss.any() and not gh.any() and not gw.any()


def test_no_tokens():
    hidden, weight, targets, _ = _inputs(0, 8, 20)
    loss, lse, gh, gw = _loss_and_grads(ck.linear_cross_entropy, hidden, weight, targets)
    assert loss.item() == 0 and lse.shape == (0,) and gh.shape == (0, 8) and not gw.any()


def test_ignore_index_and_forward_without_grad():
    hidden, weight, targets, _ = _inputs(30, 8, 20)
    targets[targets == -100] = 7
    targets[::4] = 3
    with torch.no_grad():
        got = ck.linear_cross_entropy(hidden, weight, targets, ignore_index=3, reduction="none")
    want = ref.linear_cross_entropy(hidden.double(), weight.double(), targets, ignore_index=3, reduction="none")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_raw_forward_without_grads_still_differentiates():
    """A raw forward call that did not compute gradients recomputes them in backward (mean and sum)."""
    hidden, weight, targets, lw = _inputs(25, 12, 40, weights=True)
    for code, reduction in ((1, "sum"), (2, "mean")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = ops.linear_cross_entropy_forward(h, w, targets, lw, -100, 0.1, 1e-3, 2.0, code, False)[0]
        gh, gw = torch.autograd.grad(loss * 3, (h, w))
        _, _, rh, rw = _loss_and_grads(ref.linear_cross_entropy, hidden.double(), weight.double(), targets,
                                       loss_weights=lw.double(), reduction=reduction, label_smoothing=0.1,
                                       z_loss=1e-3, softcap=2.0)
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        want = torch.autograd.grad(3 * ref.linear_cross_entropy(h64, w64, targets, loss_weights=lw.double(),
                                                                reduction=reduction, label_smoothing=0.1,
                                                                z_loss=1e-3, softcap=2.0), (h64, w64))
        torch.testing.assert_close(gh.double(), want[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gw.double(), want[1], atol=1e-5, rtol=1e-4)


def test_thread_count_does_not_change_results():
    hidden, weight, targets, lw = _inputs(50, 20, 500, weights=True)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_loss_and_grads(ck.linear_cross_entropy, hidden, weight, targets, loss_weights=lw))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_opcheck():
    hidden, weight, targets, lw = _inputs(13, 8, 30, weights=True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    for code, grads in ((0, False), (1, True), (2, True), (2, False)):
        torch.library.opcheck(ops.linear_cross_entropy_forward.default,
                              (h, w, targets, lw, -100, 0.1, 1e-3, 2.0, code, grads))
    lse = ops.linear_cross_entropy_forward(hidden, weight, targets, None, -100, 0.0, 0.0, 0.0, 0, False)[1]
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (torch.randn(13), hidden, weight, targets, None, lse, -100, 0.0, 0.0, 0.0))


def test_torch_compile_fullgraph():
    hidden, weight, targets, lw = _inputs(20, 16, 50, weights=True)

    def step(h, w):
        return ck.linear_cross_entropy(h, w, targets, loss_weights=lw, z_loss=1e-3, softcap=5.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(lambda h, w, t, return_lse, **kw: (compiled(h, w), None), hidden, weight, targets)
    want = _loss_and_grads(lambda h, w, t, return_lse, **kw: (step(h, w), None), hidden, weight, targets)
    for a, b in zip((got[0], got[2], got[3]), (want[0], want[2], want[3])):
        torch.testing.assert_close(a, b)


# ---- bad input: the Python API and the raw op -------------------------------------------------------------

def _raw(hidden, weight, targets, loss_weights=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
         z_loss=0.0, softcap=None):
    code = {"none": 0, "sum": 1, "mean": 2}[reduction]
    return ops.linear_cross_entropy_forward(hidden, weight, targets, loss_weights, ignore_index, label_smoothing,
                                            z_loss, 0.0 if softcap is None else softcap, code, False)


def _bad_cases():
    h, w, y, lw = _inputs(6, 4, 10, weights=True)
    nan_h = h.clone()
    nan_h[2, 1] = float("nan")
    out_of_range = y.clone()
    out_of_range[3] = 10
    negative = y.clone()
    negative[0] = -5
    return [
        ("hidden", ValueError, (h[:, :3], w, y), {}),
        ("weight", TypeError, (h, w.double(), y), {}),
        ("weight", TypeError, (h, w.half(), y), {}),
        ("targets", TypeError, (h, w, y.int()), {}),
        ("targets", ValueError, (h, w, y[:5]), {}),
        ("loss_weights", ValueError, (h, w, y), {"loss_weights": lw[:4]}),
        ("loss_weights", ValueError, (h, w, y), {"loss_weights": -lw}),
        ("device", ValueError, (h, w.to("meta"), y), {}),
        ("targets", IndexError, (h, w, out_of_range), {}),
        ("targets", IndexError, (h, w, negative), {}),
        ("hidden", ValueError, (nan_h, w, y), {}),
        ("contiguous", ValueError, (h.t().contiguous().t(), w, y), {}),
        ("label_smoothing", ValueError, (h, w, y), {"label_smoothing": 1.5}),
        ("z_loss", ValueError, (h, w, y), {"z_loss": float("inf")}),
        ("softcap", ValueError, (h, w, y), {"softcap": 1e300}),
    ]


@pytest.mark.parametrize("entry", ["python", "raw"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: f"{c[0]}-{c[1].__name__}")
def test_bad_input_raises_naming_the_argument(case, entry):
    name, error, args, kw = case
    fn = ck.linear_cross_entropy if entry == "python" else _raw
    with pytest.raises(error, match=name):
        fn(*args, **kw)


@pytest.mark.parametrize("kw,error", [({"reduction": "avg"}, ValueError), ({"softcap": 0.0}, ValueError),
                                      ({"ignore_index": 1.5}, TypeError), ({"z_loss": "1"}, TypeError),
                                      ({"return_lse": 1}, TypeError),
                                      ({"ignore_index": 2**64}, ValueError)])  # past the op's int64
def test_bad_python_scalars(kw, error):
    h, w, y, _ = _inputs(4, 4, 10)
    with pytest.raises(error, match=next(iter(kw))):
        ck.linear_cross_entropy(h, w, y, **kw)


def test_supports():
    assert ck.linear_cross_entropy_supports(torch.randn(5, 4, dtype=torch.bfloat16))
    assert not ck.linear_cross_entropy_supports(torch.randn(5, 4, dtype=torch.float64))
    assert not ck.linear_cross_entropy_supports(torch.randn(5, 4, device="meta"))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):  # not an AttributeError
        ck.linear_cross_entropy_supports(None)


def test_raw_backward_checks_its_extra_tensors():
    h, w, y, _ = _inputs(6, 4, 10)
    lse = _raw(h, w, y, reduction="none")[1]
    with pytest.raises(ValueError, match="grad_loss"):
        ops.linear_cross_entropy_backward(torch.ones(5), h, w, y, None, lse, -100, 0.0, 0.0, 0.0)
    with pytest.raises(TypeError, match="lse"):
        ops.linear_cross_entropy_backward(torch.ones(6), h, w, y, None, lse.double(), -100, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="lse"):
        ops.linear_cross_entropy_backward(torch.ones(6), h, w, y, None, lse * float("nan"), -100, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="compute_grad"):
        ops.linear_cross_entropy_forward(h, w, y, None, -100, 0.0, 0.0, 0.0, 0, True)


# ---- CM3Leon.loss ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
def test_model_loss_runs_the_fused_op(monkeypatch, tied):
    import dataclasses

    from model_fixtures import LAYOUTS

    import cm3leon.model as model_module

    calls = []
    fused = ck.linear_cross_entropy
    monkeypatch.setattr(model_module.ck, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    model = model_module.CM3Leon(dataclasses.replace(LAYOUTS["cm3leon"], tie_embeddings=tied))
    tokens, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    weights = torch.rand(2, 9)
    loss = model.loss(tokens, targets, weights)
    loss.backward()
    head = model.embed.weight if tied else model.lm_head.weight
    assert calls and head.grad is not None and head.grad.abs().sum() > 0
    logits = model(tokens).reshape(-1, 97)
    plain = (torch.nn.functional.cross_entropy(logits, targets.reshape(-1), reduction="none") *
             weights.reshape(-1)).sum() / weights.sum()
    torch.testing.assert_close(loss, plain)


def test_second_backward_through_a_retained_graph_raises():
    """The stored gradients are scaled in place in backward (no [V, D] copy), so they serve one backward."""
    hidden, weight, targets, _ = _inputs(10, 8, 20)
    h = hidden.clone().requires_grad_()
    loss = ck.linear_cross_entropy(h, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
