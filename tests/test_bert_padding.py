"""cm3leon_kernels.bert_padding: flash-attn 2.8's padding helpers (return tuples, inverses, gradients)."""

from __future__ import annotations

import pytest
import torch

from cm3leon_kernels import bert_padding as bp


def _mask(lengths, seqlen):
    return torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize(
    "lengths,seqlen,tail", [([5, 0, 3], 5, (2, 3)), ([7], 7, (4,)), ([1, 6, 2, 6], 6, ())]
)
def test_unpad_pad_roundtrip_and_tuple(lengths, seqlen, tail):
    x = torch.randn(len(lengths), seqlen, *tail, dtype=torch.float64)
    mask = _mask(lengths, seqlen)
    packed, indices, cu, max_seqlen, seqused = bp.unpad_input(x, mask.int())
    assert packed.shape == (sum(lengths), *tail)
    assert torch.equal(packed, x[mask])
    assert indices.dtype == torch.int64 and torch.equal(indices, mask.flatten().nonzero().flatten())
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert max_seqlen == max(lengths) and isinstance(max_seqlen, int)
    assert seqused.dtype == torch.int32 and seqused.tolist() == lengths
    back = bp.pad_input(packed, indices, len(lengths), seqlen)
    assert torch.equal(back, torch.where(mask.view(*mask.shape, *(1,) * len(tail)), x, 0))


def test_unused_mask_is_packed_but_not_counted_as_used():
    x = torch.randn(2, 4, 3)
    mask, unused = _mask([2, 1], 4), torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0]])
    packed, indices, cu, max_seqlen, seqused = bp.unpad_input(x, mask, unused)
    assert cu.tolist() == [0, 3, 5] and max_seqlen == 3 and seqused.tolist() == [2, 1]
    assert torch.equal(packed, x[mask | unused.bool()])


def test_gradients_flow_through_unpad_and_pad():
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    mask = _mask([5, 2, 0], 5)
    torch.autograd.gradcheck(lambda t: bp.unpad_input(t, mask)[0], (x,))
    packed, indices, *_ = bp.unpad_input(x.detach(), mask)
    packed.requires_grad_(True)
    torch.autograd.gradcheck(lambda t: bp.pad_input(t, indices, 3, 5), (packed,))
    rows = torch.tensor([4, 0, 7])
    torch.autograd.gradcheck(lambda t: bp.index_first_axis(t.flatten(0, 1), rows), (x,))
    torch.autograd.gradcheck(
        lambda t: bp.index_put_first_axis(t, rows, 9), (packed[:3].detach().requires_grad_(),)
    )


def test_index_first_axis_residual_gradient_reaches_input_twice():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([1, 1, 4])
    picked, residual = bp.index_first_axis_residual(x, rows)
    assert torch.equal(picked, x[rows]) and torch.equal(residual, x)
    g_rows, g_res = torch.randn(3, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    torch.autograd.backward((picked, residual), (g_rows, g_res))
    assert torch.allclose(x.grad, g_res.index_add(0, rows, g_rows))


def test_concatenated_sequences_become_separate_documents():
    x = torch.randn(3, 6, 2)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    packed, indices, cu, max_seqlen = bp.unpad_input_for_concatenated_sequences(x, lengths)
    assert cu.tolist() == [0, 2, 5, 8, 10, 16] and max_seqlen == 6
    assert torch.equal(packed, x[_mask([5, 5, 6], 6)])
    assert torch.equal(bp.pad_input(packed, indices, 3, 6)[:, :5], x[:, :5])


def test_pad_input_accepts_int32_indices():
    # flash-attn's pad_input/index_put_first_axis take int32 positions as well as int64 ones.
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = _mask([2, 3], 3)
    packed, indices, *_ = bp.unpad_input(x, mask)
    packed.requires_grad_(True)
    back = bp.pad_input(packed, indices.int(), 2, 3)
    assert torch.equal(back, bp.pad_input(packed, indices, 2, 3))
    back.sum().backward()
    assert torch.equal(packed.grad, torch.ones_like(packed))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: bp.unpad_input(torch.randn(2, 4, 3), torch.ones(2, 5)), ValueError, "attention_mask"),
        (lambda: bp.index_first_axis(torch.randn(4, 2), torch.tensor([0.5])), TypeError, "indices"),
        (lambda: bp.index_first_axis(torch.tensor(4.0), torch.tensor([0])), ValueError, "input"),
        (lambda: bp.pad_input(torch.randn(2, 3), torch.tensor([0, 1]), 2.0, 2), TypeError, "batch"),
        (lambda: bp.pad_input(torch.randn(2, 3), torch.tensor([0, 1]), 2, -2), ValueError, "seqlen"),
        (
            lambda: bp.index_put_first_axis(torch.randn(1, 3), torch.tensor([0]), -1),
            ValueError,
            "first_axis_dim",
        ),
        (lambda: bp.index_first_axis(torch.randn(2, 3), torch.tensor([True, False])), TypeError, "indices"),
        (
            lambda: bp.unpad_input_for_concatenated_sequences(
                torch.randn(1, 3, 2), torch.tensor([[2, 2, 0]])
            ),
            ValueError,
            "attention_mask_in_length",
        ),
    ],
)
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
